import pytest

from tia2.errors import UserError
from tia2.specs import Mean, Model, TextNorm, UncertaintyRegularized, parse_spec


@pytest.mark.parametrize("text, canonical", [
    ("pickscore", "pickscore"),
    ("  textnorm( pickscore ,tau = 0.01 )", "textnorm(pickscore, tau=0.01)"),
    ("textnorm(clip, tau=2, contrast=rules)", "textnorm(clip, tau=2, contrast=rules)"),
    ("mean(a,b , c)", "mean(a, b, c)"),
    ("ur(textnorm(imagereward,tau=1),textnorm(pickscore,tau=0.1),lam=0.5)",
     "ur(textnorm(imagereward, tau=1), textnorm(pickscore, tau=0.1), lam=0.5)"),
    ("ur(a, b)", "ur(a, b, lam=1)"),
    ("clip@v2", "clip@v2"),
])
def test_canonical_form_round_trips(text, canonical):
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec


def test_structure_and_models():
    spec = parse_spec("ur(textnorm(a, tau=0.5), mean(b@x, a), lam=2)")
    assert spec == UncertaintyRegularized(
        (TextNorm(Model("a"), 0.5), Mean((Model("b", "x"), Model("a")))), 2.0)
    assert spec.models() == {Model("a"), Model("b", "x")}


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("foo(a)", "unknown function 'foo'"),
    ("textnorm(a, tau=0)", "tau must be > 0"),
    ("textnorm(a, tau=-1)", "tau must be > 0"),
    ("textnorm(a, tau=x)", "tau must be a number"),
    ("textnorm(a, tau=nan)", "tau must be > 0"),
    ("ur(a, b, lam=-1)", "lam must be >= 0"),
    ("textnorm(a, tau=1", "unbalanced parentheses"),
    ("textnorm(a)", "textnorm() needs tau=T"),
    ("textnorm(a, contrast=rules)", "textnorm() needs tau=T"),
    ("mean(" * 5000 + "a", "nested more than 50 functions deep"),
    ("mean(a, b))", "unbalanced parentheses"),
    ("mean(a)", "at least two specs"),
    ("textnorm(a, b)", "exactly one spec"),
    ("textnorm(a, beta=1)", "no parameter 'beta'"),
    ("mean(a, b) c", "unexpected 'c'"),
    ("a;drop", "unexpected character ';'"),
    ("mean(a,)", "expected a reward model name"),
])
def test_bad_specs_are_clear_errors(text, message):
    with pytest.raises(UserError) as err:
        parse_spec(text)
    assert message in str(err.value)
    assert "column" in str(err.value) or message == "empty"
