"""The layout box raster (ldmtool's own hybrid layout models): painter's order, coverage, padding, and the
same raster in training and in the layout2img command."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import ldmtool
from ldmtool.errors import UsageError
from ldmtool.pipelines.box_raster import box_labels, box_raster
from ldmtool.train import autoencoder as ae, common, diffusion as df
from ldmtool.train.procedural import CLASSES, layout_sample

TINY_AE = ae.AutoencoderArch(factor=4, ch=32, num_res_blocks=1)
TINY_UNET = df.UNetArch(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_head_channels=32)


def test_later_boxes_paint_over_earlier_ones():
    labels = box_labels([(0, (0.0, 0.0, 0.5, 0.5)), (2, (0.25, 0.25, 1.0, 0.5))], 4, 4)
    np.testing.assert_array_equal(labels, [[1, 1, 0, 0], [1, 3, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_raster_is_the_share_of_each_latent_pixel_a_class_covers():
    # 8x8 image, factor 4: a box over columns 0..5 and rows 0..1 covers latent (0, 0) by 8/16, (0, 1) by 4/16
    raster = box_raster([(1, (0.0, 0.0, 0.75, 0.25))], 2, (8, 8), (2, 2), 4)
    np.testing.assert_array_equal(raster[0], np.zeros((2, 2)))
    np.testing.assert_array_equal(raster[1], [[0.5, 0.25], [0.0, 0.0]])


def test_padding_beyond_the_image_is_covered_by_no_box():
    """A 6x6 image on an 8x8 canvas (factor 4): the whole-image box covers 9 of the first latent pixel's 16."""
    raster = box_raster([(0, (0.0, 0.0, 1.0, 1.0))], 1, (6, 6), (2, 2), 4)
    np.testing.assert_array_equal(raster[0], [[1.0, 0.5], [0.5, 0.25]])


def test_raster_of_a_procedural_scene_marks_where_its_boxes_are_drawn():
    image, boxes = layout_sample(seed=4, size=64)
    labels = box_labels([(b.cls, (b.x0, b.y0, b.x1, b.y1)) for b in boxes], 64, 64)
    for cls in {b.cls for b in boxes}:
        region = image[labels == cls + 1].astype(float).mean(0)  # the class's texture is drawn exactly there
        assert np.abs(region - np.array(CLASSES[cls].colour)).max() < 45, CLASSES[cls].name


# ---------------------------------------------------------------- training and the command


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(2):
        Image.fromarray(layout_sample(i, 48)[0]).save(folder / f"{i}.png")
    training = ae.AutoencoderTraining(crop=32, batch_size=2, lr=1e-3)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ae")
    return ae.train_autoencoder(TINY_AE, training, sorted(folder.glob("*.png")),
                                common.RunOptions(out=out, steps=2, save_every=1000, log_every=1, device="cpu", quiet=True))


def _run(out: Path, steps: int) -> common.RunOptions:
    return common.RunOptions(out=out, steps=steps, save_every=1000, log_every=1, device="cpu", quiet=True)


def _training(**kw) -> df.DiffusionTraining:
    return df.DiffusionTraining(task=df.Task.LAYOUT, crop=32, batch_size=2, text_width=32, text_layers=1, **kw)


def test_box_raster_is_only_for_layouts():
    with pytest.raises(UsageError, match="--box-raster is for --task layout"):
        df.DiffusionTraining(task=df.Task.SEMANTIC, box_raster=True)


@pytest.fixture(scope="module")
def hybrid(first_stage, tmp_path_factory) -> Path:
    return df.train_diffusion(TINY_UNET, _training(box_raster=True), first_stage, [],
                              _run(tmp_path_factory.mktemp("hybrid"), steps=2))


def test_hybrid_export_records_the_raster_classes_and_loads(hybrid):
    document = yaml.safe_load(hybrid.with_name("model.yaml").read_text())
    params = document["model"]["params"]
    assert params["conditioning_key"] == "hybrid"
    assert params["unet_config"]["params"]["in_channels"] == 3 + 3
    assert document["ldmtool"]["box_raster"] is True
    assert [c["name"] for c in document["ldmtool"]["classes"]] == ["Swimming pool", "Building", "Tree"]
    bundle = ldmtool.load_model(hybrid)
    assert bundle.conditioning_key == "hybrid" and type(bundle.cond_stage).__name__ == "BERTEmbedder"


def test_the_command_builds_the_raster_the_model_was_trained_on(first_stage, hybrid, tmp_path):
    from ldmtool.io.discover import Item
    from ldmtool.pipelines.engine import Engine, ModelChoice, SamplingChoice
    from ldmtool.pipelines.layout2img import Layout2ImgTask
    from ldmtool.runtime.runner import Job

    trainer = df.DiffusionTrainer(TINY_UNET, _training(box_raster=True), df.load_first_stage(first_stage, torch.device("cpu")),
                                  [], torch.device("cpu"), torch.float32)
    _, layouts = trainer.samples(3)
    boxes = layouts[0]
    trained = trainer.layout_raster([boxes])
    assert trained.shape == (1, 3, 8, 8) and trained.sum() > 0

    names = {"water": "Swimming pool", "rock": "Building", "tree": "Tree"}
    objects = [{"label": names[CLASSES[b.cls].name], "box": [b.x0, b.y0, b.x1, b.y1]} for b in boxes]
    path = tmp_path / "scene.json"
    path.write_text(json.dumps({"units": "relative", "objects": objects}))
    task = Layout2ImgTask(Engine(ModelChoice(model=str(hybrid), device="cpu"), SamplingChoice()), width=32, height=32)
    task.open()
    job = Job(item=Item(key="scene.json", stem="scene", path=path), index=0, seed=0, output=Path("scene.png"))
    job.payload = task.load(job)
    cond, _ = task.conditioning(task.engine, job, (8, 8))
    torch.testing.assert_close(cond.concat.float(), trained, rtol=0, atol=1e-3)  # fp16 weights: fp16 raster on GPU
    assert cond.crossattn is not None  # the box tokens still go in by cross-attention


def test_hybrid_model_runs_tiled_and_refuses_classes_it_does_not_draw(hybrid, tmp_path):
    from clirun import run_cli

    good = tmp_path / "good.json"
    good.write_text('{"objects": [{"label": "Tree", "box": [0.1, 0.1, 0.5, 0.9]}]}')
    bad = tmp_path / "bad.json"
    bad.write_text('{"objects": [{"label": "Person", "box": [0.1, 0.1, 0.5, 0.9]}]}')
    result = run_cli("layout2img", good, bad, "--model", hybrid, "-o", tmp_path / "out", "--steps", "2",
                     "--sampler", "euler", "--quiet", "--width", "96", "--height", "64", "--tile", "16")
    assert result.exit_code == 1, result.output
    with Image.open(tmp_path / "out" / "good.png") as image:
        assert image.size == (96, 64)
    failed = [line for line in result.output.splitlines() if "failed:" in line]
    assert len(failed) == 1 and f"{bad}: 'Person' is not a class this model draws (Swimming pool, Building, Tree)" in failed[0]
    assert not (tmp_path / "out" / "bad.png").exists()


def test_init_from_a_token_only_model_zeroes_the_new_raster_inputs(first_stage, tmp_path):
    tokens_only = df.train_diffusion(TINY_UNET, _training(), first_stage, [], _run(tmp_path / "a", steps=1))
    source = {k[len(df.UNET_PREFIX):]: v for k, v in load_file(str(tokens_only)).items() if k.startswith(df.UNET_PREFIX)}
    trainer = df.DiffusionTrainer(TINY_UNET, _training(box_raster=True, init=str(tokens_only)),
                                  df.load_first_stage(first_stage, torch.device("cpu")), [], torch.device("cpu"), torch.float32)
    assert trainer.initialised == len(source)  # every tensor taken, the input conv widened
    first = trainer.unet.state_dict()["input_blocks.0.0.weight"]
    torch.testing.assert_close(first[:, :3], source["input_blocks.0.0.weight"])
    assert first.shape[1] == 6 and not first[:, 3:].any()


def test_hybrid_config_without_raster_classes_is_fatal(hybrid, tmp_path):
    import shutil

    from clirun import run_cli

    broken = tmp_path / "broken.safetensors"
    shutil.copy(hybrid, broken)
    document = yaml.safe_load(hybrid.with_name("model.yaml").read_text())
    del document["ldmtool"]["box_raster"]
    broken.with_suffix(".yaml").write_text(yaml.safe_dump(document))
    layout = tmp_path / "a.json"
    layout.write_text('{"objects": [{"label": "Tree", "box": [0.1, 0.1, 0.5, 0.9]}]}')
    result = run_cli("layout2img", layout, "--model", broken, "-o", tmp_path / "out", "--steps", "1", "--quiet")
    assert result.exit_code == 3 and "needs `ldmtool: box_raster: true`" in result.output, result.output
