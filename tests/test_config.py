"""Settings: values that must be refused with one line, and comparing with saved configs."""

import json

import pytest

from fedmpi import sweep
from fedmpi.algorithms import server_opt
from fedmpi.config import (AGGREGATORS, EXECUTION_KEYS, FIELDS, RESUMABLE, SERVER_OPTIMIZERS,
                           Config, from_dict, parse_args)
from fedmpi.errors import UserError


@pytest.mark.parametrize("flag", ["--lr", "--server-lr", "--alpha", "--server-tau", "--prox-mu",
                                  "--synthetic-alpha", "--weight-decay", "--momentum", "--trim"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "Infinity"])
def test_non_finite_numbers_are_refused(flag, value):
    with pytest.raises(UserError, match=f"{flag} .*finite"):
        parse_args([f"{flag}={value}"])


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_toml_values_are_refused(tmp_path, value):
    f = tmp_path / "c.toml"
    f.write_text(f"lr = {'inf' if value == float('inf') else 'nan'}\n")
    with pytest.raises(UserError, match="--lr .*finite"):
        parse_args(["--config", str(f)])


@pytest.mark.parametrize("hidden", ["[1.5, true]", "[8, true]", "[8, 2.0]", '["8"]'])
def test_toml_hidden_must_be_integers(tmp_path, hidden):
    f = tmp_path / "c.toml"
    f.write_text(f"hidden = {hidden}\n")
    with pytest.raises(UserError, match="--hidden .*integers"):
        parse_args(["--config", str(f)])


def test_toml_hidden_list_still_accepted(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("hidden = [32, 16]\n")
    assert parse_args(["--config", str(f)]).hidden == (32, 16)
    f.write_text("hidden = []\n")
    assert parse_args(["--config", str(f)]).hidden == ()


def test_saved_config_without_a_setting_means_its_default():
    """An older file lacks settings added since; they had their default values then."""
    cfg = Config()
    saved = json.loads(cfg.to_json())
    for name in ("hidden", "aggregator", "trim", "lr"):
        older = {k: v for k, v in saved.items() if k != name}
        assert cfg.differences(older) == [], name
    changed = Config(hidden=(8,))
    assert changed.differences({k: v for k, v in saved.items() if k != "hidden"}) == ["hidden"]


@pytest.mark.parametrize("k, trim", [(5, 0.1), (9, 0.1), (3, 0.3), (4, 0.0)])
def test_trimmed_mean_that_trims_nothing_is_refused(k, trim):
    with pytest.raises(UserError, match=r"trims floor\(.*\) = 0 updates"):
        from_dict({"aggregator": "trimmed_mean", "trim": trim, "clients_per_round": k})


def test_trimmed_mean_that_trims_is_accepted():
    cfg = from_dict({"aggregator": "trimmed_mean", "trim": 0.1, "clients_per_round": 10})
    assert int(cfg.trim * cfg.clients_per_round) == 1
    # trim is only used by trimmed_mean
    from_dict({"aggregator": "mean", "trim": 0.1, "clients_per_round": 5})


def test_choice_lists_have_one_source():
    assert server_opt.SERVER_OPTIMIZERS is SERVER_OPTIMIZERS
    assert FIELDS["server_optimizer"].metadata["choices"] is SERVER_OPTIMIZERS
    assert FIELDS["aggregator"].metadata["choices"] is AGGREGATORS
    for kind in SERVER_OPTIMIZERS:  # every name the user may choose is implemented
        server_opt.ServerOptimizer(kind, 3, lr=1.0)
    assert RESUMABLE == set(EXECUTION_KEYS) | {"rounds"}
    assert set(sweep.RESERVED) <= set(EXECUTION_KEYS)


def test_proportional_sampling_draws_clients_by_size():
    """First (and here only) draw: client k with probability n_k / n."""
    import numpy as np

    from fedmpi.schedule import sample_clients

    sizes = np.array([1, 2, 3, 4, 10])
    counts = np.zeros(5)
    rounds = 4000
    for r in range(1, rounds + 1):
        (c,) = sample_clients(5, 1, 0, r, sizes=sizes)
        counts[c] += 1
    p = sizes / sizes.sum()
    # within 4.5 standard deviations of the binomial count
    assert (np.abs(counts - rounds * p) < 4.5 * np.sqrt(rounds * p * (1 - p))).all(), counts
    many = sample_clients(5, 5, 0, 1, sizes=sizes)
    assert many.tolist() == [0, 1, 2, 3, 4]  # without replacement
    assert sample_clients(5, 2, 7, 3).tolist() == sample_clients(5, 2, 7, 3).tolist()


def test_uniform_weighting_option():
    from fedmpi.algorithms import make
    from fedmpi.model.mlp import MLP

    model = MLP((2, 2))
    assert make(from_dict({}), model).weight(7) == 7.0
    assert make(from_dict({"client_weighting": "uniform"}), model).weight(7) == 1.0
    assert make(from_dict({"client_weighting": "uniform", "algorithm": "fedprox"}),
                model).weight(7) == 1.0


def test_differences_treat_the_solved_noise_of_a_target_epsilon_as_derived():
    """A --dp-target-epsilon run's file records the multiplier solved for it: the
    same command (no multiplier given) is the same run; another target is not, and
    without a target the multiplier itself is compared."""
    target = from_dict({"dp_clip": 1.0, "dp_target_epsilon": 8.0})
    saved = {**target.to_dict(), "dp_noise_multiplier": 0.764}
    assert target.differences(saved) == []
    assert target.differences({**saved, "dp_target_epsilon": 4.0}) == ["dp_target_epsilon"]
    fixed = from_dict({"dp_clip": 1.0, "dp_noise_multiplier": 0.5})
    assert fixed.differences({**fixed.to_dict(), "dp_noise_multiplier": 0.764}) == [
        "dp_noise_multiplier"]
