import json

import pytest

from peftlab import LoraConfig, PeftlabError
from peftlab.core.search import SearchBudget, SearchResult, Trial, pareto_front


def test_pareto_front_keeps_the_undominated_points_by_cost():
    points = [(0.80, 100), (0.85, 300), (0.70, 50), (0.80, 200), (0.85, 400), (0.90, 1000)]
    assert pareto_front(points) == [2, 0, 1, 5]
    assert pareto_front([(0.5, 10), (0.5, 10)]) == [0, 1]  # equal points dominate neither


@pytest.mark.parametrize("kwargs,field", [({"trials": 0}, "trials"), ({"trials": 2.5}, "trials"),
                                          ({"steps": 0}, "steps"), ({"minutes": -1}, "minutes"),
                                          ({"minutes": float("nan")}, "minutes")])
def test_budget_refuses_what_cannot_run(kwargs, field):
    with pytest.raises(PeftlabError, match=f"SearchBudget.{field}="):
        SearchBudget(**kwargs)


def test_result_saves_the_found_config_and_every_trial(tmp_path):
    from peftlab.core.config import load_config

    found = LoraConfig(r=4)
    trials = [Trial(LoraConfig(r=2), 0.7, 10, 1.0), Trial(found, 0.8, 20, 1.5, {"step": 1})]
    SearchResult("lora", found, trials, SearchBudget(trials=2), 2.5, front=[0, 1]).save(tmp_path)
    assert load_config(tmp_path / "config.json") == found
    saved = json.loads((tmp_path / "search.json").read_text())
    assert [t["score"] for t in saved["trials"]] == [0.7, 0.8] and saved["budget"]["trials"] == 2
