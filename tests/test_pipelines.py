"""Pipelines: every shipped file resolves, variables and overrides, stage options, skip-if-same-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffeat.errors import DiffeatError
from diffeat.pipelines import KINDS, load_pipeline, parse_pipeline, run_pipeline

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "pipelines").glob("*.yaml"))
TINY = {"defaults.limit": 120, "probe.min_steps": 20}  # the linear head's L-BFGS takes well under a second


def _dummy_values(path: Path) -> dict:
    """Dummy values for the variables a pipeline leaves to the user (null in the file)."""
    pipeline = load_pipeline(path, environ={})
    return {k: f"/dummy/{k}" for k, v in pipeline.variables.items() if v is None}


def test_the_paper_pipelines_ship():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "imagenet_linear", "ablation_block_t", "imagenet50_heads", "fgvc_transfer", "cka_study"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_pipeline_parses_and_resolves(path):
    values = _dummy_values(path)
    pipeline = load_pipeline(path, values, environ={})
    instances = pipeline.instances()
    assert instances
    for inst in instances:
        args = inst.arguments()
        text = json.dumps(args)
        assert "${" not in text, f"{inst.name}: unresolved variable in {text}"
        for k in inst.kind.required:
            assert args.get(k) not in (None, ""), f"{inst.name}: {k}"
    # A variable left to the user is refused with the way to set it.
    if values:
        name = min(values)
        with pytest.raises(DiffeatError, match=f"--set {name}=VALUE.*DIFFEAT_VAR_{name.upper()}"):
            load_pipeline(path, {k: v for k, v in values.items() if k != name}, environ={}).instances()


def test_packaged_demo_is_the_shipped_demo():
    packaged = REPO / "diffeat" / "pipelines" / "demo.yaml"
    assert packaged.read_text() == (REPO / "pipelines" / "demo.yaml").read_text()


def test_paper_settings_in_the_headline_pipeline():
    inst = {i.name: i for i in load_pipeline(REPO / "pipelines" / "imagenet_linear.yaml",
                                             _dummy_values(REPO / "pipelines" / "imagenet_linear.yaml"),
                                             environ={}).instances()}
    args = inst["extract"].arguments()
    assert (args["blocks"], args["ts"], args["pools"], args["dataset"]) == ([24], [90, 150], [1, 2], "imagenet")
    assert inst["probe"].arguments()["test_split"] == "val"


def test_foreach_instances_need_their_own_dataset_only():
    path = REPO / "pipelines" / "fgvc_transfer.yaml"
    inst = {i.name: i for i in load_pipeline(path, _dummy_values(path), environ={}).instances()}
    assert {n.split("@")[1] for n in inst if n.startswith("extract@")} == {
        "aircraft", "cars", "cub", "dogs", "flowers", "nabirds"}
    assert inst["probe_flat@cub"].needs == ["extract@cub"]
    assert inst["probe_flat@flowers"].arguments()["train_split"] == "trainval"
    assert inst["probe_maps@dogs"].arguments()["out"].endswith("probe_cnn/dogs")
    assert len(inst["report"].needs) == 36  # extract, three ADM probe stages, the ResNet-50 extract and probe
    assert inst["probe_resnet@cub"].needs == ["extract_resnet@cub"]
    assert inst["extract_resnet@cub"].arguments()["model"] == "microsoft/resnet-50"
    assert "ts" not in inst["extract_resnet@cub"].arguments()


def test_variable_precedence_file_env_set():
    doc = {"vars": {"root": "/file", "t": 90}, "stages": {"extract": {
        "dataset": "cub", "root": "${root}/CUB", "model": "m", "store": "s.zarr", "matrix": {"block": 24, "t": "${t}"}}}}
    args = lambda p: p.instances()[0].arguments()
    assert args(parse_pipeline(doc, environ={}))["root"] == "/file/CUB"
    env = {"DIFFEAT_VAR_ROOT": "/env", "DIFFEAT_VAR_T": "[10, 150]"}
    assert args(parse_pipeline(doc, environ=env))["root"] == "/env/CUB"
    assert args(parse_pipeline(doc, environ=env))["ts"] == [10, 150]  # typed: YAML, a whole-value list
    got = args(parse_pipeline(doc, overrides={"root": "/set", "extract.batch_size": 8}, environ=env))
    assert got["root"] == "/set/CUB" and got["batch_size"] == 8


def test_mistakes_are_named():
    base = {"dataset": "cub", "model": "m", "store": "s.zarr", "matrix": {"block": 24, "t": 90}}
    with pytest.raises(DiffeatError, match="declares no variable 'rooot'.*its variables: root"):
        parse_pipeline({"vars": {"root": None}, "stages": {"extract": base}}, overrides={"rooot": "/x"}, environ={})
    with pytest.raises(DiffeatError, match="unknown extract option 'batchsize'.*batch_size"):
        parse_pipeline({"stages": {"extract": {**base, "batchsize": 4}}}).instances()
    with pytest.raises(DiffeatError, match="grid axes go under `matrix:`"):
        parse_pipeline({"stages": {"extract": {**base, "block": 24}}}).instances()
    with pytest.raises(DiffeatError, match="no matrix axis 'head'"):
        parse_pipeline({"stages": {"extract": {**base, "matrix": {"head": "linear"}}}}).instances()
    with pytest.raises(DiffeatError, match="cycle: a -> b -> a"):
        parse_pipeline({"vars": {"a": "${b}", "b": "x${a}"}, "stages": {"extract": {**base, "root": "${a}"}}}
                       ).instances()
    with pytest.raises(DiffeatError, match="kind 'train'"):
        parse_pipeline({"stages": {"train": {}}})
    with pytest.raises(DiffeatError, match="needs names 'probe', which is not an earlier stage"):
        parse_pipeline({"stages": {"extract": {**base, "needs": ["probe"]}, "probe": {}}}).instances()
    with pytest.raises(DiffeatError, match="missing option.*store"):
        parse_pipeline({"stages": {"probe": {"dataset": "cub", "out": "r"}}}).instances()
    with pytest.raises(DiffeatError, match="matrix.block value 'x' must be an integer"):
        parse_pipeline({"stages": {"extract": {**base, "matrix": {"block": "x", "t": 90}}}}).instances()
    assert set(KINDS) == {"extract", "probe", "cka", "report"}


def test_escape_and_text_interpolation():
    doc = {"vars": {"a": 3, "name": "run"}, "stages": {"extract": {
        "dataset": "cub", "model": "m-$${literal}", "store": "${name}_${a}.zarr", "matrix": {"block": 1, "t": 1}}}}
    args = parse_pipeline(doc, environ={}).instances()[0].arguments()
    assert args["model"] == "m-${literal}" and args["store"] == "run_3.zarr"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo pipeline on a reduced grid (2 blocks, 1 t, 120 images a split), run once."""
    out = tmp_path_factory.mktemp("pipe") / "demo"
    values = {"out": str(out), "blocks": [3, 7], "ts": [50], **TINY}
    report = run_pipeline(load_pipeline("demo", values, environ={}))
    return out, values, report


def test_demo_pipeline_runs_and_writes_its_outputs(demo_run):
    out, _, report = demo_run
    assert [s.status for s in report.stages] == ["ran"] * 6
    for name in ("summary.md", "accuracy.png", "cka.png", "cka.csv", "results.csv", "cka_baseline/cka.png"):
        assert (out / name).is_file(), name
    # digits-ddpm's blocks against every stage of the random ResNet: one matrix across two models
    across = report.outcome("cka_baseline").outputs
    assert across["row_labels"] == ["digits-ddpm:b3/t50/p1", "digits-ddpm:b7/t50/p1"]
    assert across["col_labels"] == [f"random-tiny-resnet:b{b}/p1" for b in range(5)]
    assert "cka_baseline/cka.png" in (out / "summary.md").read_text()
    assert (out / ".diffeat-demo-extract.json").is_file()  # beside the store
    record = json.loads((out / "probe" / ".diffeat-demo-probe.json").read_text())  # beside the probe runs
    assert record["config_hash"] == report.outcome("probe").config_hash
    assert record["arguments"]["blocks"] == [3, 7] and record["arguments"]["heads"] == ["linear"]
    assert len(report.outcome("extract").outputs["settings"]) == 4  # 2 blocks x train/test


def test_rerun_skips_and_a_changed_option_reruns_what_depends_on_it(demo_run):
    _, values, first = demo_run
    again = run_pipeline(load_pipeline("demo", values, environ={}))
    assert [s.status for s in again.stages] == ["skipped"] * 6
    assert [s.config_hash for s in again.stages] == [s.config_hash for s in first.stages]
    changed = run_pipeline(load_pipeline("demo", {**values, "probe.min_steps": 25}, environ={}))
    assert {s.name: s.status for s in changed.stages} == {
        "extract": "skipped", "probe": "ran", "cka": "skipped", "extract_baseline": "skipped",
        "cka_baseline": "skipped", "report": "ran"}
    # Outputs that disappeared are made again even with the same config.
    Path(changed.outcome("cka").outputs["files"]["csv"]).unlink()
    dry = run_pipeline(load_pipeline("demo", {**values, "probe.min_steps": 25}, environ={}), dry_run=True)
    assert {s.name: s.status for s in dry.stages} == {
        "extract": "current", "probe": "current", "cka": "planned", "extract_baseline": "current",
        "cka_baseline": "current", "report": "current"}
    only = run_pipeline(load_pipeline("demo", {**values, "probe.min_steps": 25}, environ={}), stages=["cka"])
    assert [(s.name, s.status) for s in only.stages] == [("extract", "skipped"), ("cka", "ran")]


def test_run_command_dry_run_json(demo_run):
    from diffeat.cli.run import run

    _, values, _ = demo_run
    args = ["demo", "--dry-run", "--json"]
    for key, value in {**values, "probe.min_steps": 25}.items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    result = CliRunner().invoke(run, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [s["status"] for s in doc["stages"]] == ["current"] * 6
    bad = CliRunner().invoke(run, ["demo", "--set", "nosuchvar=1"])
    assert isinstance(bad.exception, DiffeatError) and "declares no variable 'nosuchvar'" in str(bad.exception)
