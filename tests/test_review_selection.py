"""Which cases a review export takes, and how each was chosen."""

import pytest

from nnunetv2_em.errors import EMInputError
from nnunetv2_em.review import ranked_by, select_cases

RANKED = [{"case": f"c{i}", "review_score": 1.0 - i / 10} for i in range(10)]
ELIGIBLE = {f"c{i}" for i in range(10)}


def test_top_budget_and_audit_choose_ranked_then_random_cases_never_reviewed_twice():
    assert select_cases(RANKED, ELIGIBLE, top=3, budget=None, cases=None, already_reviewed={"c1"}) == \
        {"c0": "top", "c2": "top", "c3": "top"}
    assert list(select_cases(RANKED, ELIGIBLE, top=None, budget=0.25, cases=None, already_reviewed=set())) == \
        ["c0", "c1", "c2"]  # 25 % of 10, rounded up
    chosen = select_cases(RANKED, ELIGIBLE, top=2, budget=None, cases=None, already_reviewed={"c5"}, audit=3,
                          seed=[0, 1])
    audit = [case for case, how in chosen.items() if how == "audit"]
    assert list(chosen)[:2] == ["c0", "c1"] and len(audit) == 3 and not {"c0", "c1", "c5"} & set(audit)
    again = select_cases(RANKED, ELIGIBLE, top=2, budget=None, cases=None, already_reviewed={"c5"}, audit=3,
                         seed=[0, 1])
    assert again == chosen  # reproducible draw
    assert select_cases(RANKED, ELIGIBLE, top=None, budget=None, cases=["c7", "c2"], already_reviewed=set()) == \
        {"c7": "listed", "c2": "listed"}
    only_audit = select_cases(RANKED, ELIGIBLE, top=None, budget=None, cases=None, already_reviewed=set(), audit=2)
    assert set(only_audit.values()) == {"audit"} and len(only_audit) == 2


@pytest.mark.parametrize("options, message", [
    (dict(top=None, budget=None, cases=None), "choose the cases"),
    (dict(top=0, budget=None, cases=None), "selects no case"),
    (dict(top=None, budget=None, cases=["nope"]), "not labelled cases"),
    (dict(top=9, budget=None, cases=None, audit=5), "only 1 case"),
])
def test_impossible_selections_are_refused_with_the_fix(options, message):
    with pytest.raises(EMInputError, match=message):
        select_cases(RANKED, ELIGIBLE, already_reviewed=set(), **options)


def test_cases_can_be_ranked_by_how_much_their_raters_disagree():
    rows = [{"case": "a", "review_score": 0.9, "rater_disagreement": 0.1},
            {"case": "b", "review_score": 0.1, "rater_disagreement": 0.4},
            {"case": "c", "review_score": 0.5, "rater_disagreement": 0.4}]
    assert [row["case"] for row in ranked_by(rows, "rater_disagreement", source="x")] == ["b", "c", "a"]
    assert [row["case"] for row in ranked_by(rows, "review_score", source="x")] == ["a", "c", "b"]
    top = select_cases(ranked_by(rows, "rater_disagreement", source="x"), {"a", "b", "c"}, top=1, budget=None,
                       cases=None, already_reviewed=set())
    assert top == {"b": "top"}
    with pytest.raises(EMInputError, match="no rater disagreement.*--rank-by review_score"):
        ranked_by(RANKED, "rater_disagreement", source="cases.json")
    with pytest.raises(EMInputError, match="unknown"):
        ranked_by(rows, "size", source="x")
