"""A model-agnostic NNX trainer: `nnx.Optimizer` + one jitted, data-parallel train step.

`Trainer` takes any Flax NNX module, an optax transformation and a loss function. It
keeps the model and optimizer as `nnx.split` state -- a pytree of arrays replicated
over the mesh -- and runs

    train_step(state, rng, batch) -> (state, metrics)

as a single `jax.jit` with the batch sharded on the mesh's data axis (see
`experiments.common.sharding`). Mutable model state (BatchNorm statistics, NNX RNG
counters) is updated inside the step, and BatchNorm sees the global batch.

Loss-function contract (also used by other experiments, e.g. joint upsampling):

    loss_fn(model, batch, rng) -> (loss, aux)

where `model` is the module in training mode, `batch` the sharded batch pytree,
`rng` a typed PRNG key unique to the step (`fold_in(seed_key, step)`), `loss` a
float32 scalar and `aux` a dict of float32 scalars to log. Evaluation:

    eval_fn(model, batch) -> dict of float32 scalars (usually sums over the batch)

with `model` in evaluation mode.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from experiments.common import sharding
    >>> def loss_fn(model, batch, rng):
    ...     loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    ...     return loss, {}
    >>> trainer = Trainer(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), optax.sgd(0.1),
    ...                   loss_fn=loss_fn, mesh=sharding.create_mesh(1))
    >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 1))}
    >>> metrics = trainer.train_step(sharding.shard_batch(batch, trainer.mesh))
    >>> trainer.step, sorted(metrics)
    (1, ['loss'])
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from experiments.common import sharding as sharding_lib

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
EvalFn = Callable[[nnx.Module, Any], Mapping[str, jax.Array]]


def _set_mode(module: nnx.Module, train: bool) -> None:
    if train and hasattr(module, "train"):
        module.train()
    elif not train and hasattr(module, "eval"):
        module.eval()


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> raw uint32 key data (checkpoint formats store plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


class Trainer:
    """Owns a model and its optimizer state and runs jitted train/eval steps on a mesh.

    Args:
        model: A Flax NNX module. `model.train()` / `model.eval()` are called to build
            the train and eval graphs when the module has them. After construction
            the trainer owns the state; use `Trainer.model()` to get an up-to-date
            module.
        tx: The optax transformation (see `experiments.common.optim`).
        loss_fn: `loss_fn(model, batch, rng) -> (loss, aux_dict)`; see the module
            docstring.
        mesh: A 1-D data-parallel mesh (`sharding.create_mesh`).
        eval_fn: Optional `eval_fn(model, batch) -> dict`; enables `eval_step`.
        seed: Seed of the per-step PRNG key passed to `loss_fn`.
        learning_rate_fn: Optional schedule; its value at the step is logged as "lr".
        donate: Donate the old state buffers to the step (saves memory).
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        *,
        loss_fn: LossFn,
        mesh: Mesh,
        eval_fn: Optional[EvalFn] = None,
        seed: int = 0,
        learning_rate_fn: Optional[optax.Schedule] = None,
        donate: bool = True,
    ):
        self.mesh = mesh
        self._loss_fn = loss_fn
        self._eval_fn = eval_fn
        self._learning_rate_fn = learning_rate_fn
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        nodes = {"model": model, "optimizer": optimizer}
        _set_mode(model, train=False)
        self._eval_graphdef, _ = nnx.split(nodes)
        _set_mode(model, train=True)
        self._train_graphdef, state = nnx.split(nodes)
        self._replicated = sharding_lib.replicated_sharding(mesh)
        self._batch_sharding = sharding_lib.batch_sharding(mesh)
        # Global arrays over the whole mesh (with several processes too): see
        # `sharding.replicate`.
        self.state: nnx.State = sharding_lib.replicate(state, mesh)
        self.rng: jax.Array = sharding_lib.replicate(
            jax.random.key_data(jax.random.key(seed)), mesh
        )
        self._train_step = jax.jit(
            self._train_step_impl,
            in_shardings=(self._replicated, self._replicated, self._batch_sharding),
            out_shardings=(self._replicated, self._replicated),
            donate_argnums=(0,) if donate else (),
        )
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(self._replicated, self._batch_sharding),
            out_shardings=self._replicated,
        )

    # -- pure step functions -------------------------------------------------

    def _train_step_impl(self, state, rng, batch):
        nodes = nnx.merge(self._train_graphdef, state)
        model, optimizer = nodes["model"], nodes["optimizer"]
        step = optimizer.step[...]
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(rng), step)

        def compute_loss(model):
            loss, aux = self._loss_fn(model, batch, step_rng)
            return loss, aux

        (loss, aux), grads = nnx.value_and_grad(compute_loss, has_aux=True)(model)
        optimizer.update(model, grads)
        metrics = {"loss": loss, **aux}
        if self._learning_rate_fn is not None:
            metrics["lr"] = jnp.asarray(self._learning_rate_fn(step), jnp.float32)
        return nnx.state(nodes), metrics

    def _eval_step_impl(self, state, batch):
        if self._eval_fn is None:
            raise ValueError("Trainer was built without eval_fn; pass eval_fn to use eval_step")
        nodes = nnx.merge(self._eval_graphdef, state)
        return dict(self._eval_fn(nodes["model"], batch))

    # -- public API ------------------------------------------------------------

    def train_step(self, batch: Any) -> dict[str, jax.Array]:
        """Runs one optimizer step on a global batch (already sharded; see `sharding.shard_batch`).

        Returns:
            The metrics dict (replicated device scalars; not yet fetched to host).
        """
        self.state, metrics = self._train_step(self.state, self.rng, batch)
        return metrics

    def eval_step(self, batch: Any) -> dict[str, jax.Array]:
        """Runs `eval_fn` on a global batch with the model in eval mode."""
        return self._eval_step(self.state, batch)

    @property
    def step(self) -> int:
        """Number of optimizer steps taken so far (a host int; synchronises)."""
        return int(jax.device_get(self.state["optimizer"]["step"][...]))

    def model(self, train: bool = False) -> nnx.Module:
        """A fresh module holding the current parameters (eval mode unless `train`)."""
        graphdef = self._train_graphdef if train else self._eval_graphdef
        return nnx.merge(graphdef, self.state)["model"]

    def checkpoint_tree(self) -> dict[str, Any]:
        """The state to checkpoint: {"state": nested dict of arrays, "rng": uint32 key data}.

        Typed PRNG keys inside the model (e.g. dropout `nnx.Rngs`) are stored as raw
        key data.
        """
        return {"state": _keys_to_data(nnx.to_pure_dict(self.state)), "rng": self.rng}

    def abstract_checkpoint_tree(self) -> dict[str, Any]:
        """`jax.ShapeDtypeStruct`s (with shardings) matching `checkpoint_tree()`."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated),
            jax.eval_shape(self.checkpoint_tree),
        )

    def load_checkpoint_tree(self, tree: Mapping[str, Any]) -> None:
        """Replaces the state with a tree produced by `checkpoint_tree()` (e.g. restored)."""
        template = nnx.to_pure_dict(self.state)

        def restore_leaf(old, new):
            if not _is_key(old):
                return new
            impl = jax.random.key_impl(old)
            wrap = jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl),
                           out_shardings=self._replicated)
            return wrap(sharding_lib.replicate(new, self.mesh))

        restored = jax.tree.map(restore_leaf, template, dict(tree["state"]))
        state = self.state
        nnx.replace_by_pure_dict(state, restored)
        self.state = sharding_lib.replicate(state, self.mesh)
        self.rng = sharding_lib.replicate(tree["rng"], self.mesh)
