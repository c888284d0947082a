"""Test-wide JAX settings, applied before any test module builds arrays.

* x64 is enabled so float64 oracles can be compared at 1e-12; float32 and
  16-bit tests build their arrays with explicit dtypes.
* Strict dtype promotion and rank promotion errors (as equinox's tests do)
  catch silent upcasts and broadcasting mistakes inside the library.
* 8 virtual CPU devices back the sharding tests.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


# --- the fast set ------------------------------------------------------------------
# `make test` runs the tests not marked slow; CI also runs the slow set, so the
# two together run every case. Most slow marks sit on the parameters; the
# rules below thin out matrices whose parameters are crossed, keeping each
# value of every parameter in the fast set but not every combination.

_PAIRS = {("mean", "vjp"), ("none", "jvp")}


def _slow_case(name: str, params: dict) -> bool:
    if name in ("test_cross_entropy_equals_unsharded", "test_linear_cross_entropy_equals_unsharded"):
        # Two corners of (check_vma, reduction, derivative): checked-mean-vjp
        # and unchecked-none-jvp; every other combination in the slow set.
        corner = (params["check_vma"], params["reduction"], params["derivative"])
        return corner not in ((True, "mean", "vjp"), (False, "none", "jvp"))
    if name == "test_unchecked_shard_map_gradients_are_not_divided_by_the_shard_count":
        return (params["reduction"], params["derivative"]) not in _PAIRS
    if name == "test_matches_plain_path":
        return params["reduction"] == "sum"
    if name == "test_code_blocks_run_as_written":
        # The README in the fast set, the guides in the slow one.
        return params["page"].name != "README.md"
    if name == "test_forward_mode_matches_plain_path":
        return params["reduction"] != "none"
    if name == "test_export_with_a_symbolic_token_count":
        return bool(params["kw"])
    if name == "test_weighted_loss_and_gradient":
        # Every option set with "mean"; "sum" and "none" with class weights.
        return params["reduction"] != "mean" and params["name"] != "weight"
    if name == "test_gradient_equals_autodiff_of_the_naive_formula":
        # log_probs: the untempered case; distillation: one setting in the fast set.
        return params.get("transform") == (1.0, None) or params.get("setting", (0.7, 0.2)) != (0.7, 0.2)
    if name == "test_value_and_gradient_match_float64_references":
        # cross_entropy's residual branches: two option sets with "mean"
        # in the fast set; every option and reduction in the slow one.
        return params["reduction"] != "mean" or params["name"] not in ("plain", "aux")
    if name == "test_extreme_rows_agree_between_branches_and_with_float64":
        return params["case"] not in ("far_label", "pos_inf", "masked_nan")
    if name == "test_the_one_logits_sized_residual":
        return params["classes"] != 37
    if name == "test_training_step_writes_the_gradient_in_place":
        return params["v"] == 8192
    if name == "test_values_match_float64_numpy":
        return params["setting"] != (0.7, 0.2) and params["dtype"] != jnp.float64
    return False


_SLOW_TESTS = {
    # The fused path's Hessian-vector product and jacfwd (17 s); the logit
    # level's Hessians stay in the fast set.
    "test_forward_mode_hessian_vector_product_and_jacfwd_in_float64",
}


import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        name = getattr(item, "originalname", item.name)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if name in _SLOW_TESTS or (params and _slow_case(name, params)):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["cpu", "accelerator"])
def residual_branch(request, monkeypatch):
    """Runs a test under each branch of ``cross_entropy``'s platform-dependent
    residuals: ``"cpu"`` keeps ``exp(s - m)``, ``"accelerator"`` (the GPU/TPU
    branch, forced on CPU through the same switch) keeps the logits."""
    from jaxsce import _logit_ce

    monkeypatch.setattr(_logit_ce, "CPU_KEEPS_EXP", request.param == "cpu")
    jax.clear_caches()  # the switch is read when tracing
    yield request.param
    jax.clear_caches()
