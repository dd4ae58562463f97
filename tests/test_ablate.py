"""ablate.py's equal-steps runs: every mix, whatever its size, gets about the same number of optimizer steps, through
train_vpit.py's own knobs."""
import ablate
import train_vpit
from configurator import configure


def test_equal_steps_runs_train_the_same_number_of_steps_through_train_vpit_knobs():
    runs = ablate.STUDIES["tab4_steps"][1] + ablate.STUDIES["tab6_steps"][1]
    assert len({tuple(sorted(mix.items())) for _, mix, _ in runs}) == 6  # tab4's and tab6's six distinct mixes
    for name, mixture, extra in runs:
        assert name.endswith(f"-{ablate.ablate_equal_steps}steps")
        knobs = configure(dict(vars(train_vpit)), ["--vpit_lead_in={}", *extra, f"--vpit_data={mixture}"])
        assert knobs["vpit_lead_in"] == mixture  # the run's own --vpit_lead_in wins over ablate's "{}"
        epochs = knobs["vpit_lead_in_epochs"] + knobs["vpit_epochs"]  # the lead-in, then stage 2's one epoch
        steps = epochs * sum(mixture.values()) / 16
        assert abs(steps - ablate.ablate_equal_steps) <= sum(mixture.values()) / 16 / 2 + 1, (mixture, steps)
