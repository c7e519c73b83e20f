"""The properties every implementation of the DDF op must have, written once.

`OpProperties` holds the tests; each implementation's test file subclasses it
once per way of running (XLA; Pallas in interpret mode or compiled on a GPU;
jax-triton in Triton's interpreter or on a GPU). A subclass says

- how to get the op: `get_op(tiles)` returns the implementation's canonical
  op ``op(x, channel_filter, spatial_filter_5d, config)``, given a label of
  its own `TILES` (None for its default tiles);
- which cases it serves: one list per property (`GRADIENT_CASES`,
  `FORWARD_CASES`, `LOW_PRECISION_CASES`, ...). An empty list means the
  implementation does not serve that property here; pytest then reports the
  test as skipped with an empty parameter set.

Every result is compared element-wise with the float64 loop reference
(`tests/reference.py`) within the roundoff bound of `tests/roundoff.py`,
never with another implementation. The op is called through the public
`ddf_jax.ddf(..., implementation=op)`, so the argument checks and the 4-D
spatial filter are exercised too. Compiled test functions are cached per
(subclass, case, dtypes), so that tests of the same case share one compile.
"""

import functools
import zlib
from typing import NamedTuple, Optional

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import ddf_jax
from tests import roundoff
from tests.utils import fast_compile_options, random_ddf_inputs

# Dtypes of (x, channel_filter, spatial_filter, grad_out) for the low-precision cases.
DTYPES = {
    "float32": (jnp.float32,) * 4,
    "bfloat16": (jnp.bfloat16,) * 4,
    "float16": (jnp.float16,) * 4,
    # bfloat16 activations with float32 filters: each array keeps its own dtype.
    "bfloat16_x_float32_filters": (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16),
}


class Case(NamedTuple):
    """One configuration: shapes (N, H, W, C), kernel size, stride, dilation, heads, combine, tiles.

    heads None passes a 4-D spatial filter (one head). tiles names an entry of
    the subclass's `TILES` (None: the implementation's default tiles).
    """

    n: int
    h: int
    w: int
    c: int
    k: int
    stride: int = 1
    dilation: int = 1
    heads: Optional[int] = None
    combine: str = "mul"
    tiles: Optional[str] = None

    @property
    def id(self) -> str:
        heads = "4d" if self.heads is None else f"g{self.heads}"
        name = f"n{self.n}_{self.h}x{self.w}x{self.c}_k{self.k}_s{self.stride}_d{self.dilation}_{heads}_{self.combine}"
        return name + (f"_{self.tiles}" if self.tiles else "")

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def out_shape(self):
        return (self.n, -(-self.h // self.stride), -(-self.w // self.stride), self.c)

    def inputs(self, dtypes="float32", seed=0, batch=()):
        """Random (x, cf, sf, g), standard normal, rounded to `dtypes`; `batch` prepends axes."""
        arrays = random_ddf_inputs(self.seed + seed, int(np.prod(batch, dtype=int)) * self.n, self.h, self.w,
                                   self.c, self.k, self.stride, self.heads, np.float32)
        return tuple(a.reshape(tuple(batch) + (self.n,) + a.shape[1:]).astype(d)
                     for a, d in zip(arrays, DTYPES[dtypes]))


def _param_id(value):
    if hasattr(value, "marks"):  # a pytest.param: its own id
        return value.id
    if isinstance(value, Case):
        return value.id
    return "-".join(_param_id(v) for v in value) if isinstance(value, tuple) else str(value)


def vjp_function(f):
    """f(x, cf, sf) -> g(x, cf, sf, grad_out) = (out, dx, dcf, dsf) through `jax.vjp`."""

    def run(x, cf, sf, grad_out):
        out, vjp = jax.vjp(f, x, cf, sf)
        return (out,) + tuple(vjp(grad_out))

    return run


_COMPILED = {}


class OpProperties:
    """The property tests; subclass once per implementation and way of running (see the module docstring)."""

    IMPLEMENTATION = ""
    # Compile the test functions with `fast_compile_options` (on the CPU only).
    FAST_COMPILE = True
    # label -> the implementation's tile sizes, for Case.tiles.
    TILES = {}
    # How many units of roundoff the last cast to each dtype may err by (1: round to nearest).
    ROUNDING_ULPS = {}
    # Whether vmap gives bitwise the results of a loop over the mapped axis.
    VMAP_IS_BITWISE = False

    GRADIENT_CASES = []  # float32 forward and the three gradients
    FORWARD_CASES = []  # float32 forward only
    LOW_PRECISION_CASES = []  # (DTYPES key, case): forward and gradients
    FLOAT64_CASES = []  # float64 forward, and check_grads of the eager op
    VMAP_CASES = []
    PMAP_CASES = []
    DETERMINISM_CASES = []  # best taken from GRADIENT_CASES: they share its compile
    EAGER_CASES = []  # eager value_and_grad equals the jitted one
    IDENTITY_CASES = []
    EMPTY_CASES = []  # (shape, stride, dtype)
    HYPOTHESIS_EXAMPLES = 0

    _PARAMETERS = {
        "gradient_case": "GRADIENT_CASES",
        "forward_case": "FORWARD_CASES",
        "low_precision_case": "LOW_PRECISION_CASES",
        "float64_case": "FLOAT64_CASES",
        "vmap_case": "VMAP_CASES",
        "pmap_case": "PMAP_CASES",
        "determinism_case": "DETERMINISM_CASES",
        "eager_case": "EAGER_CASES",
        "identity_case": "IDENTITY_CASES",
        "empty_case": "EMPTY_CASES",
    }

    def pytest_generate_tests(self, metafunc):
        for argname, attribute in self._PARAMETERS.items():
            if argname in metafunc.fixturenames:
                values = getattr(self, attribute)
                metafunc.parametrize(argname, values, ids=[_param_id(v) for v in values])

    # --- what a subclass provides ------------------------------------------------------------

    def get_op(self, tiles=None):
        """The implementation's canonical op for the tile label `tiles` (None: default tiles)."""
        raise NotImplementedError

    # --- helpers -----------------------------------------------------------------------------

    def ddf(self, case: Case):
        """f(x, cf, sf) = `ddf_jax.ddf` with this implementation at the case's configuration."""
        return functools.partial(ddf_jax.ddf, kernel_size=case.k, stride=case.stride, dilation=case.dilation,
                                 combine=case.combine, implementation=self.get_op(case.tiles))

    def compiled(self, name, function, case: Case, args, transform=jax.jit):
        """`transform(function)` compiled for the shapes of args; cached per (subclass, name, case, shapes).

        On the CPU with `FAST_COMPILE` options that make XLA compile faster (`fast_compile_options`).
        """
        key = (type(self), name, case, tuple((a.shape, jnp.dtype(a.dtype)) for a in args))
        if key not in _COMPILED:
            options = fast_compile_options() if self.FAST_COMPILE else None
            _COMPILED[key] = transform(function).lower(*args).compile(options or None)
        return _COMPILED[key]

    def forward_and_vjp(self, case: Case, args):
        """(out, dx, dcf, dsf) of the case at args = (x, cf, sf, g), through one cached compile."""
        return self.compiled("forward_and_vjp", vjp_function(self.ddf(case)), case, args)(*args)

    def forward(self, case: Case, args):
        """out of the case at args = (x, cf, sf), through one cached compile."""
        return self.compiled("forward", self.ddf(case), case, args)(*args)

    def expected(self, case: Case, args) -> roundoff.Expected:
        ulps = max(self.ROUNDING_ULPS.get(jnp.dtype(a.dtype), 1) for a in args)
        return roundoff.expected_vjp(*args, case.k, case.stride, case.dilation, case.combine, ulps)

    def assert_matches_reference(self, case: Case, args, results):
        chex.assert_trees_all_equal_shapes_and_dtypes(tuple(results), (jnp.zeros(case.out_shape, args[0].dtype),)
                                                      + tuple(args[:3])[: len(results) - 1])
        x, cf, sf, g = args
        if len(results) == 1:
            ulps = max(self.ROUNDING_ULPS.get(jnp.dtype(a.dtype), 1) for a in args)
            value, bound = roundoff.expected_forward(x, cf, sf, case.k, case.stride, case.dilation, case.combine,
                                                     ulps)
            roundoff.assert_within(results[0], value, bound, "out")
        else:
            roundoff.assert_results_within(results, self.expected(case, args))

    # --- the properties ----------------------------------------------------------------------

    def test_forward_and_gradients(self, gradient_case):
        args = gradient_case.inputs()
        self.assert_matches_reference(gradient_case, args, self.forward_and_vjp(gradient_case, args))

    def test_forward(self, forward_case):
        args = forward_case.inputs()
        self.assert_matches_reference(forward_case, args, (self.forward(forward_case, args[:3]),))

    def test_low_precision(self, low_precision_case):
        dtypes, case = low_precision_case
        args = case.inputs(dtypes)
        self.assert_matches_reference(case, args, self.forward_and_vjp(case, args))

    def test_float64_check_grads(self, float64_case):
        case = float64_case
        with jax.enable_x64(True):
            x, cf, sf, _ = args = tuple(a.astype(jnp.float64) for a in case.inputs())
            # Jitted: one compile of the forward and one of its VJP, instead of one per eager primitive.
            f = jax.jit(self.ddf(case))
            self.assert_matches_reference(case, args, (f(x, cf, sf),))
            check_grads(f, (x, cf, sf), order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)

    def test_vmap(self, vmap_case):
        """vmap over a leading axis: of every argument, with shared filters, and nested."""
        case = vmap_case
        batch = 2
        x, cf, sf, g = args = case.inputs(batch=(batch,))
        f = vjp_function(self.ddf(case))
        batched = self.compiled("vmap", jax.vmap(f), case, args)(*args)
        # The channel filter, or both filters, shared by the examples (unbatched).
        shared_cf = self.compiled("vmap_shared_cf", jax.vmap(f, in_axes=(0, None, 0, 0)), case,
                                  (x, cf[0], sf, g))(x, cf[0], sf, g)
        shared_filters = self.compiled("vmap_shared_filters", jax.vmap(f, in_axes=(0, None, None, 0)), case,
                                       (x, cf[0], sf[0], g))(x, cf[0], sf[0], g)
        nested_args = tuple(a[:, None] for a in (x, cf, sf))
        nested = self.compiled("vmap_nested", jax.vmap(jax.vmap(self.ddf(case))), case, nested_args)(*nested_args)
        for b in range(batch):
            example = (x[b], cf[b], sf[b], g[b])
            expected = self.expected(case, example)
            roundoff.assert_results_within([r[b] for r in batched], expected)
            roundoff.assert_results_within([nested[b, 0]], expected)
            roundoff.assert_results_within([r[b] for r in shared_cf], self.expected(case, (x[b], cf[0], sf[b], g[b])))
            roundoff.assert_results_within([r[b] for r in shared_filters],
                                           self.expected(case, (x[b], cf[0], sf[0], g[b])))
            if self.VMAP_IS_BITWISE:
                chex.assert_trees_all_equal(tuple(r[b] for r in batched), tuple(self.forward_and_vjp(case, example)))

    def test_vmap_over_an_empty_axis(self, vmap_case):
        """vmap over an axis of size 0: empty results of the right shapes and dtypes."""
        case = vmap_case
        args = tuple(a[:0] for a in case.inputs(batch=(1,)))
        empty = self.compiled("vmap_empty", jax.vmap(vjp_function(self.ddf(case))), case, args)(*args)
        expected = (jnp.zeros((0,) + case.out_shape, args[0].dtype),) + args[:3]
        chex.assert_trees_all_equal_shapes_and_dtypes(tuple(empty), expected)

    def test_pmap(self, pmap_case):
        case = pmap_case
        devices = jax.local_devices()[:2]
        if len(devices) < 2:
            pytest.skip("needs two devices")
        args = case.inputs(batch=(len(devices),))
        pmap = functools.partial(jax.pmap, devices=devices)
        results = self.compiled("pmap", vjp_function(self.ddf(case)), case, args, pmap)(*args)
        for i in range(len(devices)):
            example = tuple(a[i] for a in args)
            roundoff.assert_results_within([r[i] for r in results], self.expected(case, example))

    def test_deterministic(self, determinism_case):
        """The same compiled function run twice on the same new inputs gives the same bits."""
        args = determinism_case.inputs(seed=1)
        first = jax.tree.map(np.asarray, self.forward_and_vjp(determinism_case, args))
        second = jax.tree.map(np.asarray, self.forward_and_vjp(determinism_case, args))
        chex.assert_trees_all_equal(first, second)

    def test_eager_and_jit(self, eager_case):
        """The op called eagerly (differentiated outside jit) and under jit: both match the reference."""
        case = eager_case
        args = case.inputs()
        self.assert_matches_reference(case, args, vjp_function(self.ddf(case))(*args))
        self.assert_matches_reference(case, args, jax.jit(vjp_function(self.ddf(case)))(*args))

    def test_identity_filters_copy_the_input(self, identity_case):
        """A centre-tap channel filter and an all-ones spatial filter copy x (strided)."""
        case = identity_case
        x, cf, sf, g = case.inputs()
        centre = jnp.zeros(case.k * case.k).at[case.k * case.k // 2].set(1.0)
        cf = jnp.broadcast_to(centre, cf.shape)
        sf = jnp.ones_like(sf) if case.combine == "mul" else jnp.zeros_like(sf)
        out = self.forward_and_vjp(case, (x, cf, sf, g))[0]
        chex.assert_trees_all_equal(out, x[:, :: case.stride, :: case.stride])

    def test_empty_inputs_give_zeros(self, empty_case):
        """N = 0, H = 0 or C = 0: zeros of the right shape and dtype, and zero gradients."""
        shape, stride, dtype = empty_case
        n, h, w, c = shape
        case = Case(n, h, w, c, 3, stride, heads=1 if c == 0 else 2)
        x, cf, sf, _ = case.inputs("float32")
        x, cf, sf = (a.astype(dtype) for a in (x, cf, sf))
        f = self.ddf(case)
        chex.assert_trees_all_equal_shapes_and_dtypes(f(x, cf, sf), jnp.zeros(case.out_shape, dtype))
        grads = jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(x, cf, sf)
        # cf has elements when H = 0: its gradient is an empty sum, exactly zero.
        chex.assert_trees_all_equal(grads, tuple(jnp.zeros_like(a) for a in (x, cf, sf)))

    def test_random_configurations(self):
        """Hypothesis draws configurations (shapes from 1 pixel up) and checks the forward."""
        if not self.HYPOTHESIS_EXAMPLES:
            pytest.skip(f"{self.IMPLEMENTATION}: no random configurations here")

        @hypothesis.settings(max_examples=self.HYPOTHESIS_EXAMPLES, deadline=None)
        @hypothesis.given(
            k=st.sampled_from([1, 3, 5]),
            stride=st.integers(1, 3),
            dilation=st.integers(1, 3),
            heads=st.sampled_from([1, 2, 3]),
            h=st.integers(1, 9),
            w=st.integers(1, 9),
            group=st.integers(1, 3),
            combine=st.sampled_from(["mul", "add"]),
        )
        def check(k, stride, dilation, heads, h, w, group, combine):
            case = Case(1, h, w, heads * group, k, stride, dilation, heads, combine)
            args = case.inputs()
            self.assert_matches_reference(case, args, (self.forward(case, args[:3]),))

        check()
