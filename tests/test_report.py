"""The HTML report on small real Delta tables and a fake-but-real model artifact directory."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import make_settings
from userlens.errors import UserlensError
from userlens.models.contracts import ModelMetrics, TrainingData, TrainingInfo
from userlens.models.storage import write_bytes, write_json
from userlens.report import build_report, roc_points
from userlens.tables import Tables, table_schema

AS_OF = dt.date(2026, 10, 30)
HOSTILE = "<script>alert(1)</script>"
HIDDEN = "hiddencategoryofasmallsegment"
VERSION = "20261030T010203Z-abcdef12"


def _user(i: int) -> str:
    return f"userkey-{i:04d}"  # '-' is not in the base64 alphabet, so no image can contain it


def _predictions(rng: np.random.Generator, n: int, skill: float) -> bytes:
    arrays = {}
    for task in ("purchase", "churn"):
        y = rng.integers(0, 2, n)
        arrays[f"{task}.y"] = y
        arrays[f"{task}.p"] = np.clip(0.5 + skill * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    arrays["next_category.y"] = rng.integers(0, 3, n)
    arrays["next_category.p"] = rng.dirichlet(np.ones(3), n)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _write_artifact(models: Path) -> None:
    rng = np.random.default_rng(0)
    root = f"{models}/{VERSION}"
    binary = {"auc": 0.82, "pr_auc": 0.7, "log_loss": 0.5, "ece": 0.03, "n": 200, "positives": 90}
    write_json(
        f"{root}/model.json",
        {
            "format_version": 1,
            "tasks": ["purchase", "churn", "next_category"],
            "classes": ["books", "garden", HOSTILE],
            "hidden": [8],
            "dropout": 0.1,
            "input_dim": 10,
            "numeric_dim": 2,
        },
    )
    info = TrainingInfo(
        best_epoch=3,
        best_valid_loss=0.5,
        epochs_run=5,
        samples=3500,
        fit_seconds=2.0,
        samples_per_second=1750.0,
        world_size=2,
        device="cpu",
        baseline_fallback={"purchase": "trained", "churn": "baseline"},
        dp={"epsilon": 3.21, "delta": 1e-3, "unit": "user"},
    )
    data = TrainingData(
        AS_OF.isoformat(),
        "2026-10-23",
        7,
        {
            s: {"users": n, "purchase": 5, "churn": 3, "next_category": 4}
            for s, n in (("train", 700), ("valid", 150), ("test", 200))
        },
        "minilm-test",
    )
    metrics = ModelMetrics(
        VERSION,
        "snap-1",
        model={
            "purchase": binary,
            "churn": {**binary, "auc": 0.88},
            "next_category": {"accuracy": 0.47, "top3_accuracy": 0.81, "n": 150},
        },
        baseline={
            "purchase": {**binary, "auc": 0.8},
            "churn": {**binary, "auc": 0.86},
            "next_category": {"accuracy": 0.23, "top3_accuracy": 0.6, "n": 150},
        },
        data=data,
        training=info,
        recommendations={
            "<b>popularity</b>": {"hr@10": 0.1, "ndcg@10": 0.05},
            "two-tower": {"hr@10": 0.2, "ndcg@10": 0.11},
        },
        by_group={
            "activity": {
                "groups": [
                    {
                        "group": "1-3 events",
                        "users": 40,
                        "purchase": {"auc": 0.61, "auc_se": 0.05, "ece": 0.12, "positives": 9},
                        "churn": {"ece": 0.2, "positives": 0},  # one class: no AUC
                        "next_category": {"accuracy": 0.3},
                        "recommend": {"recall@10": 0.05, "users": 12},
                    },
                    {
                        "group": "40-90 events",
                        "users": 25,
                        "purchase": {"auc": 0.9, "auc_se": 0.03, "ece": 0.04, "positives": 12},
                        "churn": {"auc": 0.7, "auc_se": 0.1, "ece": 0.05, "positives": 3},
                        "next_category": {"accuracy": 0.6},
                        "recommend": {"recall@10": 0.25, "users": 20},
                    },
                ],
                "suppressed": 1,
                "min_users": 10,
            },
            "segment": {
                "groups": [
                    {
                        "group": "segment <b>2</b>",
                        "users": 30,
                        "purchase": {"auc": 0.72, "auc_se": 0.06, "ece": 0.07, "positives": 10},
                        "churn": {"auc": 0.66, "auc_se": 0.08, "ece": 0.09, "positives": 6},
                        "next_category": {"accuracy": 0.41},
                    }
                ],
                "suppressed": 0,
                "min_users": 10,
                "segment_model_version": "seg-v1",
            },
        },
    )
    write_json(f"{root}/metrics.json", metrics.to_json())
    write_bytes(f"{root}/test_predictions.npz", _predictions(rng, 200, 0.5))
    write_bytes(f"{root}/baseline_predictions.npz", _predictions(rng, 200, 0.3))
    write_bytes(f"{models}/LATEST", (VERSION + "\n").encode())


def _write_tables(spark, settings) -> None:
    tables = Tables(spark, settings.storage)
    rng = np.random.default_rng(1)
    now = dt.datetime(2026, 10, 30, 3, 0, 0)
    earlier = AS_OF - dt.timedelta(days=1)
    scores = [
        (
            _user(i),
            day,
            VERSION,
            f"h{i}",
            float(rng.uniform()),
            float(rng.uniform()),
            "books",
            0.4,
            now,
            ["i00001", "i00002"],
            # explained: the users rescored on the last night
            [(earlier, "<b>viewed</b> 'Tent'", "purchase", 0.25), (AS_OF, "searched", "churn", -0.1)]
            if day == AS_OF
            else None,
        )
        for i in range(40)
        for day in ((earlier, AS_OF) if i % 2 else (earlier,))
    ]
    tables.merge("user_scores", spark.createDataFrame(scores, table_schema("user_scores")))
    segments = [
        (0, AS_OF, 50, True, [HOSTILE, "books"], VERSION),
        (1, AS_OF, 30, True, ["garden"], VERSION),
        (2, AS_OF, 3, False, [HIDDEN], VERSION),
    ]  # unpublished: its categories must not show
    tables.merge("segments", spark.createDataFrame(segments, table_schema("segments")))
    profiles = [
        (
            _user(i),
            AS_OF,
            [float(v) for v in rng.normal(i % 3, 1.0, 8)],
            0.5,
            0.2,
            "books",
            ["books"],
            i % 3 if i % 3 != 2 else None,
            None,
            3,
            4,
            10.0,
            VERSION,
            now,
            "encoder-a",
            VERSION,
        )
        for i in range(60)
    ]
    tables.merge("user_profiles", spark.createDataFrame(profiles, table_schema("user_profiles")))
    runs = [
        (
            "run-1",
            "ingest",
            earlier,
            "succeeded",
            now - dt.timedelta(days=1),
            now - dt.timedelta(days=1) + dt.timedelta(seconds=5),
            1000,
            990,
            '{"duplicates": 2, "quarantined": 8, "reasons": {"bad_timestamp": 8}}',
        ),
        (
            "run-2",
            "ingest",
            AS_OF,
            "succeeded",
            now,
            now + dt.timedelta(seconds=10),
            2000,
            1900,
            '{"duplicates": 0, "quarantined": 100, "reasons": {"bad_timestamp": 4, "<b>odd</b>": 96}}',
        ),
        ("run-2", "score", AS_OF, "succeeded", now, now + dt.timedelta(seconds=4), 40, 20, "{}"),
        (
            "run-2",
            "gate",
            AS_OF,
            "failed",
            now + dt.timedelta(seconds=5),
            now + dt.timedelta(seconds=6),
            None,
            None,
            json.dumps(
                {
                    "passed": False,
                    "forced": False,
                    "failed_checks": ["prices"],
                    "checks": [
                        {"name": "rows", "status": "pass", "detail": "0.93x", "value": 0.93, "limit": 5.0},
                        {
                            "name": "prices",
                            "status": "fail",
                            "detail": "<i>all</i> unpriced",
                            "value": 1.0,
                            "limit": 0.2,
                        },
                    ],
                    "notes": ["model m2 refused (storage.models/REFUSED)"],
                }
            ),
        ),
        (
            "run-2",
            "train",
            AS_OF,
            "failed",
            now,
            now + dt.timedelta(seconds=2),
            None,
            None,
            '{"error": "UserlensError: <img src=x onerror=alert(2)>"}',
        ),
    ]
    tables.merge("pipeline_runs", spark.createDataFrame(runs, table_schema("pipeline_runs")))


@pytest.fixture(scope="module")
def full_report(spark, tmp_path_factory):
    """Every section's input written, and the report built once."""
    tmp_path = tmp_path_factory.mktemp("report")
    settings = make_settings(tmp_path, f"nightly.report_dir={tmp_path / 'reports'}")
    _write_artifact(tmp_path / "models")
    _write_tables(spark, settings)
    return tmp_path, build_report(spark, settings)


def test_full_report_is_self_contained_escaped_and_private(full_report) -> None:
    tmp_path, result = full_report

    assert Path(result.path) == tmp_path / "reports" / f"userlens-report-{AS_OF.isoformat()}.html"
    assert result.rendered == [
        *("model", "scores", "segments", "by_group", "embeddings", "recommendations", "explanations"),
        *("trends", "quality", "gate", "runs"),
    ]
    assert result.skipped == []
    page = Path(result.path).read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) >= 4
    assert len(re.findall(r"<img ", page)) == page.count("data:image/png;base64,")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page  # a failed run's error, escaped
    assert "&lt;b&gt;popularity&lt;/b&gt;" in page  # a recommendation method, escaped
    assert HIDDEN not in page
    assert "1 suppressed" in page
    assert "userkey-" not in page  # no user keys
    assert "&epsilon; = 3.2100" in page and "2026-10-23" in page
    assert "the model's churn head is the baseline's logistic regression" in page  # and not purchase's
    assert "not available yet" not in page
    # each user's newest score: 40 users, not the 20 rescored on the latest date
    assert "purchase_propensity: 40 users" in page
    # each published segment's KPIs from the profiles of its segment model (0.5 and 0.2 for every profile)
    assert page.count('<td class="n">0.500</td><td class="n">0.200</td>') == 2
    assert page.count("ROC, reliability and gains curves") >= 2
    # trends: 40 users scored the night before, 20 rescored on the last; the first night has no PSI
    trends = page[page.index('<section id="trends">') : page.index('<section id="quality">')]
    assert re.search(r"<td>2026-10-29</td><td class=\"n\">40</td>", trends)
    assert re.search(r"<td>2026-10-30</td><td class=\"n\">20</td>", trends)
    assert trends.count("&ndash;") == 2  # the first night: no night before to compare with
    assert re.search(rf'<td class="n">\d+\.\d{{3}}</td><td>{VERSION}</td>', trends)  # the last: PSIs
    # each night's model with its holdout AUC (purchase / churn) from its metrics.json
    assert trends.count(f'<td>{VERSION}</td><td class="n">0.820 / 0.880</td></tr>') == 2
    # data quality: the two ingest nights side by side, oldest first, each reason as a share of the rows read
    quality = page[page.index('<section id="quality">') : page.index('<section id="gate">')]
    assert quality.index("1,000") < quality.index("2,000")
    assert "8 (0.80%)" in quality and "4 (0.20%)" in quality and "96 (4.80%)" in quality
    assert "&lt;b&gt;odd&lt;/b&gt;" in quality and "<b>odd" not in quality  # a reason's name, escaped
    # explanations: three users, no keys, each day's weight signed, the user's text escaped
    why = page[page.index('<section id="explanations">') : page.index('<section id="trends">')]
    assert why.count("<h3>user ") == 3 and "userkey-" not in why
    assert why.count('<td class="n">+0.250</td><td>&lt;b&gt;viewed&lt;/b&gt;') == 3
    assert why.count('<td class="n">-0.100</td>') == 3
    # quality by segment and by activity decile: AUC ± SE and ECE per task, accuracy, recall; escaped names
    groups = page[page.index('<section id="by_group">') : page.index('<section id="embeddings">')]
    assert "segment &lt;b&gt;2&lt;/b&gt;" in groups and "<code>seg-v1</code>" in groups
    assert '<td>1-3 events</td><td class="n">40</td><td class="n">0.610 &plusmn; 0.050</td>' in groups
    assert '<td class="n">one class only</td><td class="n">0.200</td><td class="n">0.300</td>' in groups
    assert groups.count("<th>recommend recall@10</th>") == 1  # the segments' rows have no recall: no column
    assert '<td class="n">0.250</td></tr>' in groups and "1 group(s) with fewer test users left out" in groups
    # the quality gate: the refused night, its failed check marked, every figure beside its limit
    gate = page[page.index('<section id="gate">') : page.index('<section id="runs">')]
    assert "<b>refused: nothing was published" in gate and "failed: prices" in gate
    assert '<tr class="bad"><td>prices</td><td>fail</td><td class="n">1.000</td><td class="n">0.200</td>' in gate
    assert "<tr><td>rows</td><td>pass</td>" in gate
    assert "&lt;i&gt;all&lt;/i&gt; unpriced" in gate and "model m2 refused" in gate


def _screenshot_script():
    """scripts/screenshot_report.py, the documented check, as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@contextmanager
def recording_proxy():
    """A TCP listener on a free loopback port that records the first line of every connection made to it
    (an HTTP proxy's view of a request: ``GET http://host/path`` or ``CONNECT host:443``) and closes it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    seen: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    seen.append(conn.recv(4096).split(b"\r\n", 1)[0].decode("ascii", "replace"))
                except OSError:
                    seen.append("(no request line)")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        stop.set()
        thread.join()
        server.close()


def test_the_report_renders_in_headless_chromium_without_a_network_request(full_report, tmp_path: Path) -> None:
    """The whole report loads in headless Chromium with every section in its document and paints, while a
    proxy that records every request sees none; the same page with one remote image makes the proxy see
    that image's request (the check can fail). Chromium's own calls to Google's hosts (component updates,
    sign-in) go around the proxy (scripts/screenshot_report.py); a URL of any host in the page fails the
    test above."""
    from PIL import Image

    script = _screenshot_script()
    chromium = script.find_chromium()
    if chromium is None:
        pytest.skip("no Chromium here: `make setup` installs Debian's chromium where apt-get can")
    _, result = full_report
    page = Path(result.path).read_text(encoding="utf-8")
    with recording_proxy() as (port, requests):
        rendered = script.render(page, tmp_path / "report.png", chromium, proxy_port=port)
        made = list(requests)
        remote = page.replace("</body>", '<img src="http://example.invalid/pixel.png" alt=""></body>')
        script.render(remote, tmp_path / "control.png", chromium, proxy_port=port)
        deadline = time.monotonic() + 5  # the proxy's thread records the control's request as it comes
        while not any("example.invalid" in r for r in requests) and time.monotonic() < deadline:
            time.sleep(0.05)
        control = list(requests[len(made) :])
    assert made == []
    assert any("example.invalid/pixel.png" in r for r in control), control
    for key in result.rendered:  # the gate and the quality by segment among them
        assert f'<section id="{key}">' in rendered.dom
    assert "Model quality by segment and by activity" in rendered.dom and "Quality gate" in rendered.dom
    width, height = rendered.size
    assert width == 1100 and height > 2000  # ten sections and their charts, trimmed below the last
    image = Image.open(rendered.png).convert("RGB")
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 50  # text, tables and charts, not a blank page


def test_a_section_the_report_lacks_is_named_with_those_it_has(full_report) -> None:
    script = _screenshot_script()
    _, result = full_report
    page = Path(result.path).read_text(encoding="utf-8")
    cut = script.page_of(page, ["gate", "by_group"])
    assert cut.count("<section ") == 2 and "<style>" in cut
    with pytest.raises(script.RenderError, match="no section 'nope' in the report \\(it has: model, scores"):
        script.page_of(page, ["nope"])


def test_empty_warehouse_and_models_build_with_notes(spark, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    out = tmp_path / "out" / "report.html"

    result = build_report(spark, settings, str(out))

    assert result.path == str(out) and result.rendered == []
    assert len(result.skipped) == 11
    page = out.read_text(encoding="utf-8")
    assert page.count("not available yet: run") == 11
    for stage in ("train", "score", "profile", "nightly"):
        assert f"<code>userlens {stage}</code>" in page
    assert "data:image/png" not in page and "http" not in page


def test_missing_matplotlib_names_the_extra(spark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(UserlensError, match=r"pip install 'userlens\[report\]'"):
        build_report(spark, make_settings(tmp_path))
    assert not (tmp_path / "reports").exists()


def test_roc_points_match_scikit_learn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.uniform(size=300), 2)  # ties
    fpr, tpr = roc_points(y, p)
    ref_fpr, ref_tpr, _ = metrics.roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_wilson_interval_gains_psi_and_identical_predictions() -> None:
    from userlens.report import gains_by_decile, population_stability_index, same_predictions, wilson_interval

    assert population_stability_index(np.array([5, 5]), np.array([50, 50])) == pytest.approx(0.0)
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    assert population_stability_index(np.array([2, 2]), np.array([1, 3])) == pytest.approx(0.2747, abs=1e-4)
    assert np.isfinite(population_stability_index(np.array([1, 0]), np.array([0, 1])))  # empty bins: finite

    low, high = wilson_interval(np.array([5, 0]), np.array([10, 20]))
    np.testing.assert_allclose([low[0], high[0]], [0.2366, 0.7634], atol=1e-4)  # the textbook 5 of 10
    assert low[1] == pytest.approx(0.0, abs=1e-12) and 0 < high[1] < 0.2  # none of 20: not a zero-width bar

    y = np.zeros(1000, dtype=int)
    y[:100] = 1  # the 100 positives get the 100 best scores
    p = np.linspace(1, 0, 1000)
    gains, lift = gains_by_decile(y, p)
    assert gains[0] == 1.0 and gains[-1] == 1.0 and lift[0] == pytest.approx(10.0) and lift[1:].sum() == 0
    gains, lift = gains_by_decile(y, -p)  # the worst ranking: every positive in the last decile
    assert gains[-2] == 0.0 and lift[-1] == pytest.approx(10.0)

    series = {"model": (y, p), "baseline": (y, p + 1e-9)}
    assert same_predictions(series)
    assert not same_predictions({"model": (y, p), "baseline": (y, p * 0.9)})
    assert not same_predictions({"model": (y, p)})
