"""The ``typing.overload``s of the flag-dependent returns (``return_aux``, ``return_entropy``).

Two checks: at run time, each overload's positional arguments, flag and
``TypedDict`` of options equal the implementation's signature, name for name
and type for type (a new option added to a function but not to its overloads
fails here); statically, pyright (``make lint`` includes this file) checks the
``assert_type`` lines below, which also run here and check the returned values.
"""

import inspect
import sys
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from marks import all_cases_fast

import jaxsce

if sys.version_info >= (3, 11):
    from typing import Unpack, assert_type, get_overloads
else:  # pyright reads this branch for Python 3.10 (optax's dependencies bring typing_extensions)
    from typing_extensions import Unpack, assert_type, get_overloads

FLAGGED = {
    "cross_entropy": "return_aux",
    "linear_cross_entropy": "return_aux",
    "log_probs": "return_entropy",
    "linear_log_probs": "return_entropy",
    "policy_loss": "return_aux",
    "linear_policy_loss": "return_aux",
    "preference_loss": "return_aux",
    "linear_preference_loss": "return_aux",
    "sharded_cross_entropy": "return_aux",
    "sharded_linear_cross_entropy": "return_aux",
}


@pytest.mark.parametrize("name", sorted(FLAGGED))
@all_cases_fast  # no compilation: a few ms each
def test_overloads_spell_the_implementation_signature(name):
    fn = getattr(jaxsce, name)
    flag = FLAGGED[name]
    impl = inspect.signature(fn)
    impl_hints = typing.get_type_hints(fn)
    overloads = get_overloads(fn)
    assert len(overloads) == 3, name
    returns = []
    for over in overloads:
        sig = inspect.signature(over)
        params = list(sig.parameters.values())
        positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert [p.name for p in positional] == [
            p.name for p in impl.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
        assert [p.name for p in var_kw] == ["options"]
        named = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        assert flag in named
        if sig.parameters[flag].default is not inspect.Parameter.empty:
            assert sig.parameters[flag].default is impl.parameters[flag].default is False
        # The library imports ``Unpack`` for type checkers only.
        hints = typing.get_type_hints(over, localns={"Unpack": Unpack})
        options_hint = hints["options"]
        if typing.get_origin(options_hint) is Unpack:
            (typed_dict,) = typing.get_args(options_hint)
            option_hints = typing.get_type_hints(typed_dict)
            # Every keyword option of the implementation, once, with its type.
            expected = {p.name for p in impl.parameters.values() if p.kind is p.KEYWORD_ONLY and p.name != flag}
            assert set(option_hints) == expected, (name, set(option_hints) ^ expected)
            assert not named - {flag}
            for option, hint in option_hints.items():
                assert hint == impl_hints[option], (name, option, hint, impl_hints[option])
        else:  # the sharded wrappers forward their other options
            assert impl.parameters["options"].kind is inspect.Parameter.VAR_KEYWORD
            assert named <= set(impl.parameters)
        for p in positional:
            assert hints[p.name] == impl_hints[p.name]
        returns.append(hints["return"])
    array_only, with_extra, either = returns
    assert array_only is jax.Array
    assert typing.get_origin(with_extra) is tuple
    assert set(typing.get_args(either)) == {jax.Array, with_extra}
    assert either == impl_hints["return"]


def test_flag_dependent_returns():
    """The values behind the overloads; pyright checks the ``assert_type`` lines statically."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 11)))
    labels = jnp.asarray(rng.integers(0, 11, size=6))
    hidden = jnp.asarray(rng.normal(size=(6, 4)))
    w = jnp.asarray(rng.normal(size=(4, 11)))
    adv = jnp.asarray(rng.normal(size=(2,)))

    loss = assert_type(jaxsce.cross_entropy(logits, labels), jax.Array)
    assert isinstance(loss, jax.Array) and loss.shape == ()
    loss, aux = assert_type(jaxsce.cross_entropy(logits, labels, return_aux=True), tuple[jax.Array, jaxsce.LossAux])
    assert isinstance(aux, jaxsce.LossAux)
    loss, aux = assert_type(
        jaxsce.linear_cross_entropy(hidden, w, labels, return_aux=True, label_smoothing=0.1),
        tuple[jax.Array, jaxsce.LossAux],
    )
    assert isinstance(aux, jaxsce.LossAux)

    lp = assert_type(jaxsce.log_probs(logits, labels), jax.Array)
    assert lp.shape == (6,)
    lp, ent = assert_type(jaxsce.linear_log_probs(hidden, w, labels, return_entropy=True), tuple[jax.Array, jax.Array])
    assert ent.shape == (6,)

    flag = bool(rng.integers(0, 2))
    either = assert_type(jaxsce.log_probs(logits, labels, return_entropy=flag), jax.Array | tuple[jax.Array, jax.Array])
    assert isinstance(either, tuple) == flag

    seq_logits, seq_labels = logits.reshape(2, 3, 11), labels.reshape(2, 3)
    loss, paux = assert_type(
        jaxsce.policy_loss(seq_logits, seq_labels, adv, return_aux=True), tuple[jax.Array, jaxsce.PolicyAux]
    )
    assert isinstance(paux, jaxsce.PolicyAux)
    loss = assert_type(jaxsce.linear_policy_loss(hidden.reshape(2, 3, 4), w, seq_labels, adv), jax.Array)
    assert loss.shape == ()

    pair_h, pair_y = hidden.reshape(2, 3, 4), labels.reshape(2, 3)
    loss, praux = assert_type(
        jaxsce.linear_preference_loss(pair_h[:1], pair_h[1:], w, pair_y[:1], pair_y[1:], return_aux=True),
        tuple[jax.Array, jaxsce.PreferenceAux],
    )
    assert isinstance(praux, jaxsce.PreferenceAux)
    loss = assert_type(
        jaxsce.preference_loss(seq_logits[:1], seq_logits[1:], seq_labels[:1], seq_labels[1:]), jax.Array
    )
    assert loss.shape == ()
