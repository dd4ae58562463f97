"""ablate.py's equal-steps runs: every mix, whatever its size, gets about the same number of optimizer steps, through
train_vpit.py's own knobs."""
from tools import ablate
import train_vpit
from configurator import configure


def test_equal_steps_runs_train_the_same_number_of_steps_through_train_vpit_knobs():
    runs = ablate.STUDIES["tab4_steps"][1] + ablate.STUDIES["tab6_steps"][1]
    assert len({tuple(sorted(mix.items())) for _, mix, _ in runs}) == 6  # tab4's and tab6's six distinct mixes
    for name, mixture, extra in runs:
        assert name.endswith(f"-{ablate.ablate_equal_steps}steps")
        knobs = configure(dict(vars(train_vpit)), ["--vpit_batch_size=64",  # as a config with another batch would
                                                   "--vpit_lead_in={}", *extra, f"--vpit_data={mixture}"])
        assert knobs["vpit_lead_in"] == mixture  # the run's own --vpit_lead_in wins over ablate's "{}"
        assert knobs["vpit_batch_size"] == 16  # the run's own batch too: its step count rests on it
        epochs = knobs["vpit_lead_in_epochs"] + knobs["vpit_epochs"]  # the lead-in, then stage 2's one epoch
        steps = epochs * sum(mixture.values()) / knobs["vpit_batch_size"]
        assert abs(steps - ablate.ablate_equal_steps) <= sum(mixture.values()) / 16 / 2 + 1, (mixture, steps)


def test_every_run_gets_the_config_file_ablate_was_given(monkeypatch):
    """python ablate.py configs/x.py: each train_vpit.py and eval.py run reads configs/x.py too, not the default."""
    calls = []
    monkeypatch.setattr(ablate.subprocess, "run", lambda command, check: calls.append(command))
    monkeypatch.setattr(ablate, "config_file", "configs/smol.py")
    ablate.stage("train_vpit.py", "--out_dir=x")
    assert calls[0][1:] == ["train_vpit.py", "configs/smol.py", "--out_dir=x"]


def test_a_table_shows_each_runs_mean_and_the_spread_of_its_seeds():
    results = [{"run": "a", "image_qa": 0.5, "FD": 2.0, "x": None}, {"run": "a", "image_qa": 0.7, "FD": 4.0, "x": None}]
    merged = ablate.over_seeds(results)
    assert merged["run"] == "a" and merged["FD"] == (3.0, 1.0) and merged["x"] is None
    assert abs(merged["image_qa"][0] - 0.6) < 1e-9 and abs(merged["image_qa"][1] - 0.1) < 1e-9
    text = ablate.table("t", [merged], [1, 2], ["abc (day)", "abc (day)"])
    assert "| a | 60.0 ± 10.0 | 3.000 ± 1.000 | n/a |" in text
    assert "2 seeds (1, 2). Runs made at commit abc (day)." in text


def test_each_seed_is_its_own_run(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(ablate.subprocess, "run", lambda command, check: calls.append(command))
    monkeypatch.setattr(ablate, "out_dir", str(tmp_path))
    monkeypatch.setattr(ablate, "train_only", True)
    monkeypatch.setattr(ablate, "code_version", lambda: "abc (day)")
    for seed in (1, 2):
        ablate.run("gen500", {"generation": 500}, [], seed)
    trains = [c for c in calls if "train_vpit.py" in c]
    assert [next(a for a in c if a.startswith("--seed=")) for c in trains] == ["--seed=1", "--seed=2"]
    assert len({next(a for a in c if a.startswith("--out_dir=")) for c in trains}) == 2
    assert ablate.made_at("gen500", 1) == "abc (day)" != ablate.made_at("gen500", 3)  # seed 3: never run


def test_departures_studies_are_the_equal_steps_runs_with_the_toys_departures(monkeypatch, tmp_path):
    """tab4_departures / tab6_departures: the same mixes and steps as tab4_steps / tab6_steps, in their own run folders,
    and the study's dropout and lead-in lr reach train_vpit.py over ablate's own paper-recipe values (0.0); no run
    freezes the adapter in its lead-in, whatever the config says."""
    for study in ("tab4", "tab6"):
        plain, departed = ablate.STUDIES[f"{study}_steps"][1], ablate.STUDIES[f"{study}_departures"][1]
        assert [(n + "-departures", m) for n, m, _ in plain] == [(n, m) for n, m, _ in departed]
    calls = []
    monkeypatch.setattr(ablate.subprocess, "run", lambda command, check: calls.append(command))
    monkeypatch.setattr(ablate, "out_dir", str(tmp_path))
    monkeypatch.setattr(ablate, "train_only", True)
    monkeypatch.setattr(ablate, "code_version", lambda: "abc (day)")
    name, mixture, extra = ablate.STUDIES["tab4_departures"][1][0]
    ablate.run(name, mixture, extra, 1)
    ablate.run("gen500", {"generation": 500}, [], 1)
    departed, paper = (configure(dict(vars(train_vpit)), c[2:]) for c in calls)  # over configs/tiny.py's values
    assert departed["drawn_token_dropout"] == ablate.ablate_dropout > 0 and departed["vpit_lead_in"] == mixture
    assert departed["vpit_lead_in_lr"] == ablate.ablate_lead_in_lr > 0
    assert paper["drawn_token_dropout"] == 0 and paper["vpit_lead_in_lr"] == 0 and paper["vpit_lead_in"] == {}
    assert departed["vpit_lead_in_frozen"] == paper["vpit_lead_in_frozen"] == []  # the tables' recipe: all trained
    assert departed["vpit_lead_out"] == paper["vpit_lead_out"] == {}  # and no lead-out


def test_tab3_departures_is_cosine_against_l1_on_the_same_mix_and_steps():
    """The cosine run is tab4_departures' own (trained once for both tables); the L1 run differs in the loss alone."""
    cosine, l1 = ablate.STUDIES["tab3_departures"][1]
    assert cosine in ablate.STUDIES["tab4_departures"][1] and l1[0] != cosine[0] and l1[1] == cosine[1]
    knobs = [configure(dict(vars(train_vpit)), [*extra, f"--vpit_data={mixture}"])
             for _, mixture, extra in (cosine, l1)]
    assert (knobs[0]["vision_loss"], knobs[1]["vision_loss"]) == ("cosine", "l1")
    same = ("vpit_lead_in", "vpit_lead_in_epochs", "vpit_batch_size", "drawn_token_dropout", "vpit_lead_in_lr")
    assert all(knobs[0][k] == knobs[1][k] for k in same) and knobs[1]["drawn_token_dropout"] > 0
