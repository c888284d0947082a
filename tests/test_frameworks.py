"""A framework's parameter object passed instead of its value is a TypeError naming the argument."""

import jax.numpy as jnp
import numpy as np
import pytest
from marks import all_cases_fast

import jaxsce


class Wrapped:
    """Like flax's nnx.Variable: converts to an array through __jax_array__, but is not one."""

    def __init__(self, value):
        self.value = value

    def __jax_array__(self):
        return self.value


class Holder:
    """A parameter object without __jax_array__ that holds its array in .value."""

    def __init__(self, value):
        self.value = value


H, W, Y = jnp.ones((4, 3)), jnp.ones((3, 10)), jnp.array([1, 2, 3, 4])


@pytest.mark.parametrize("kind", [Wrapped, Holder])
@pytest.mark.parametrize(
    "call, name",
    [
        (lambda k: jaxsce.linear_cross_entropy(H, k(W), Y), "linear_weight"),
        (lambda k: jaxsce.linear_cross_entropy(k(H), W, Y), "hidden"),
        (lambda k: jaxsce.cross_entropy(k(H @ W), Y), "logits"),
        (lambda k: jaxsce.linear_log_probs(H, W, Y, linear_bias=k(jnp.zeros(10))), "linear_bias"),
        (lambda k: jaxsce.distillation_loss(H @ W, teacher_logits=k(H @ W)), "teacher_logits"),
    ],
)
@all_cases_fast
def test_parameter_objects_are_named(kind, call, name):
    with pytest.raises(TypeError, match=rf"{name} is a .*{kind.__name__}.*pass its value \({name}\[\.\.\.\]"):
        call(kind)


def test_arrays_and_numbers_pass():
    # NumPy arrays, Python numbers and jax arrays are values, not parameter objects.
    out = jaxsce.linear_cross_entropy(np.ones((4, 3)), np.ones((3, 10)), np.array([1, 2, 3, 4]), temperature=2)
    np.testing.assert_allclose(out, np.log(10), rtol=1e-6)


def test_flax_nnx_param():
    nnx = pytest.importorskip("flax.nnx")
    param = nnx.Param(W)
    with pytest.raises(TypeError, match=r"linear_weight is a flax\.nnx\..*Param"):
        jaxsce.linear_cross_entropy(H, param, Y)
    np.testing.assert_allclose(jaxsce.linear_cross_entropy(H, param[...], Y), np.log(10), rtol=1e-6)
