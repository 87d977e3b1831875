import numpy as np
import pytest
import torch
from av2.datasets.motion_forecasting.eval import metrics as av2m

from forecast_peft.constants import METRICS
from forecast_peft.metrics import ForecastMetrics, scene_metrics


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    y = torch.cumsum(torch.randn(50, 60, 2, generator=g), dim=1)
    y_hat = y[:, None] + torch.randn(50, 6, 60, 2, generator=g) * torch.linspace(0.2, 3, 6)[None, :, None, None]
    pi = torch.randn(50, 6, generator=g)
    return y_hat, pi, y


def test_against_av2_reference(data):
    y_hat, pi, y = data
    ours = scene_metrics(y_hat, pi, y)
    for i in range(len(y)):
        f, g = y_hat[i].double().numpy(), y[i].double().numpy()
        p = torch.softmax(pi[i].double(), -1).numpy()
        ade, fde = av2m.compute_ade(f, g), av2m.compute_fde(f, g)
        best, top = int(np.argmin(fde)), int(np.argmax(p))
        assert ours["minFDE6"][i] == pytest.approx(fde[best], rel=1e-5)
        assert ours["minADE6"][i] == pytest.approx(ade[best], rel=1e-5)
        assert ours["minFDE1"][i] == pytest.approx(fde[top], rel=1e-5)
        assert ours["minADE1"][i] == pytest.approx(ade[top], rel=1e-5)
        assert ours["MR6"][i] == float(av2m.compute_is_missed_prediction(f, g).all())
        brier = av2m.compute_brier_fde(f, g, p, normalize=True)
        assert ours["brier-minFDE6"][i] == pytest.approx(brier[best], rel=1e-5)
        # which modes those are (per_scenario.csv)
        assert (int(ours["top_mode"][i]), int(ours["best_mode"][i])) == (top, best)
        assert ours["top_prob"][i] == pytest.approx(p[top], rel=1e-5)


def test_summed_states_merge_like_one_process(data):
    y_hat, pi, y = data
    whole = ForecastMetrics()
    whole.update(y_hat, pi, y)
    parts = [ForecastMetrics(), ForecastMetrics()]
    parts[0].update(y_hat[:17], pi[:17], y[:17])
    parts[1].update(y_hat[17:], pi[17:], y[17:])
    # what the DDP sync does with dist_reduce_fx="sum" (a real two-process sync: test_ddp.py);
    # by hand, since Metric.merge_state is new in torchmetrics 1.6
    for name in (*METRICS, "count"):
        setattr(parts[0], name, getattr(parts[0], name) + getattr(parts[1], name))
    a, b = whole.compute(), parts[0].compute()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert int(parts[0].count) == 50


def test_a_nan_forecast_is_a_miss(data):
    """A diverged model's NaN endpoints: NaN > 2 m is false, so they counted as hits (MR6 0.0
    logged for a run whose every other metric was NaN)."""
    y_hat, pi, y = data
    y_hat = y_hat.clone()
    y_hat[0] = float("nan")
    values = scene_metrics(y_hat, pi, y)
    assert values["MR6"][0] == 1.0 and torch.isnan(values["minFDE6"][0])
    assert torch.equal(values["MR6"][1:], scene_metrics(y_hat[1:], pi[1:], y[1:])["MR6"])


def test_each_horizon_takes_its_own_nearest_mode(data):
    """minFDE6 at 1-5 s: the smallest error over the modes at that step (10, 20, ... 50: the
    forecast's steps are 0.1-6 s ahead), each horizon its own mode; a NaN mode leaves it NaN."""
    from forecast_peft.constants import HORIZON_COLUMNS

    y_hat, pi, y = data
    values = scene_metrics(y_hat, pi, y)
    err = np.linalg.norm(y_hat.double().numpy() - y.double().numpy()[:, None], axis=-1)  # [B, K, 60]
    for seconds, column in enumerate(HORIZON_COLUMNS, start=1):
        np.testing.assert_allclose(values[column].numpy(), err[:, :, seconds * 10 - 1].min(-1), rtol=1e-5)
    # one scene by hand: mode 0 on the ground truth for 2 s then 10 m off, mode 1 always 3 m off
    truth = torch.zeros(1, 60, 2)
    modes = torch.full((1, 6, 60, 2), 50.0)
    modes[0, :2] = 0.0
    modes[0, 0, 20:, 1] = 10.0  # from 2.1 s on
    modes[0, 1, :, 0] = 3.0
    one = scene_metrics(modes, torch.zeros(1, 6), truth)
    assert [float(one[c][0]) for c in HORIZON_COLUMNS] == [0.0, 0.0, 3.0, 3.0, 3.0]
    assert float(one["minFDE6"][0]) == 3.0 and int(one["best_mode"][0]) == 1
    modes[0, 4, 9] = float("nan")
    one = scene_metrics(modes, torch.zeros(1, 6), truth)
    assert torch.isnan(one[HORIZON_COLUMNS[0]][0]) and float(one[HORIZON_COLUMNS[1]][0]) == 0.0
