"""Few-step models on the command line (issue 25, item 6): --cfg 1 runs the UNet once per step, --spacing and
--tcd-gamma reach the sampler and the recipe, and a distilled model's file name gives its published settings
(options the user gives win; the recipe records which came from the name; one notice line says so)."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldmtool.addons.distilled import distilled_settings
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.checkpoints.tiny import save_tiny_checkpoint
from ldmtool.cli.app import main
from ldmtool.io.metadata import read_metadata
from ldmtool.nets.unet import UNetModel
from tests.test_sd_vs_diffusers import sd1 as sd1  # (the tiny SD 1.x file with its diffusers twin)

SIZE = ("-W", "64", "-H", "64", "--tile", "0", "--seed", "3", "--quiet")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fewstep")
    model = folder / "sd1.safetensors"
    save_tiny_checkpoint(model, "sd1", with_config=True)
    g = torch.Generator().manual_seed(1)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    weights = {f"{key}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{key}.lora_up.weight": torch.randn(32, 2, generator=g), f"{key}.alpha": torch.tensor(1.0)}
    lora = folder / "Hyper-SD15-2steps-lora.safetensors"
    save_safetensors(weights, lora)
    plain = folder / "style.safetensors"
    save_safetensors(weights, plain)  # the same weights under a name that says nothing
    return model, lora, plain


def run(*args, code=0):
    try:
        main([*map(str, args)])
    except SystemExit as exit:
        assert (exit.code or 0) == code
    else:
        assert code == 0


def recipe(path):
    metadata = read_metadata(path)
    assert metadata is not None
    return metadata.recipe["parameters"], metadata.parameters


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.mark.parametrize("cfg, calls_per_step", [("1", 1), ("5", 2)])
def test_cfg_1_runs_the_unet_once_per_step(files, tmp_path, monkeypatch, cfg, calls_per_step):
    """Counts the UNet's forward calls and the rows they carry: with --cfg 1 (and a negative prompt, which
    guidance would use) one call of one row per step; with guidance the unconditional row doubles both."""
    model, _, _ = files
    rows = []
    forward = UNetModel.forward

    def counting(self, x, *args, **kwargs):
        rows.append(x.shape[0])
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", counting)
    run("txt2img", "--prompt", "a fox", "--negative", "blurry", "--model", model, "--sampler", "euler",
        "--steps", 3, "--cfg", cfg, *SIZE, "-o", tmp_path / "a.png")
    assert len(rows) == 3 * calls_per_step and sum(rows) == 3 * calls_per_step


def test_distilled_lora_name_gives_its_published_settings_and_the_user_wins(files, tmp_path, capsys):
    model, lora, plain = files
    common = ("txt2img", "--prompt", "a fox", "--model", model, *SIZE)
    run(*common[:-1], "--lora", lora, "-o", tmp_path / "named.png")  # not --quiet: the notice shows
    notice = capsys.readouterr().err
    assert notice.count("Hyper-SD15-2steps-lora.safetensors: Hyper-SD's published settings") == 1
    assert "--sampler euler --spacing trailing --steps 2 --cfg 1" in notice
    params, text = recipe(tmp_path / "named.png")
    assert (params["sampler"], params["spacing"], params["steps"], params["cfg"]) == ("euler", "trailing", 2, 1.0)
    assert params["distilled"] == {"model": "Hyper-SD", "file": lora.name, "from_file_name": {
        "sampler": "euler", "spacing": "trailing", "steps": 2, "cfg": 1.0}}
    assert "Steps: 2, Sampler: Euler, Schedule type: Uniform, CFG scale: 1" in text
    # the same image as the settings given by hand with a file whose name says nothing
    run(*common, "--lora", plain, "--sampler", "euler", "--spacing", "trailing", "--steps", 2, "--cfg", 1,
        "-o", tmp_path / "by-hand.png")
    assert np.array_equal(pixels(tmp_path / "named.png"), pixels(tmp_path / "by-hand.png"))
    # options given win, and the recipe says the rest came from the name
    run(*common, "--lora", lora, "--steps", 3, "--cfg", 2, "-o", tmp_path / "mine.png")
    params, _ = recipe(tmp_path / "mine.png")
    assert (params["steps"], params["cfg"], params["spacing"]) == (3, 2.0, "trailing")
    assert params["distilled"]["from_file_name"] == {"sampler": "euler", "spacing": "trailing"}


def test_spacing_and_tcd_gamma_reach_the_sampler_and_the_recipe(files, tmp_path):
    model, _, _ = files
    common = ("txt2img", "--prompt", "a fox", "--model", model, "--steps", 2, *SIZE)
    run(*common, "--sampler", "euler", "--spacing", "SGM Uniform", "-o", tmp_path / "sgm.png")
    run(*common, "--sampler", "euler", "--spacing", "leading", "-o", tmp_path / "leading.png")
    params, text = recipe(tmp_path / "sgm.png")
    assert params["spacing"] == "sgm_uniform" and "Schedule type: SGM Uniform" in text
    assert not np.array_equal(pixels(tmp_path / "sgm.png"), pixels(tmp_path / "leading.png"))
    run(*common, "--sampler", "tcd", "--tcd-gamma", 0.5, "-o", tmp_path / "tcd.png")
    params, _ = recipe(tmp_path / "tcd.png")
    assert (params["sampler"], params["spacing"], params["tcd_gamma"]) == ("tcd", "lcm", 0.5)
    run(*common, "--sampler", "lcm", "-o", tmp_path / "lcm.png")
    assert recipe(tmp_path / "lcm.png")[0]["spacing"] == "lcm"


@pytest.mark.parametrize("args, message", [
    (("--spacing", "even"), "--spacing 'even' is not a spacing (choose one of uniform, quad, leading"),
    (("--spacing", "trailing", "--karras"), "--spacing trailing contradicts --karras"),
    (("--sampler", "euler", "--tcd-gamma", "0.3"), "--tcd-gamma 0.3 does not apply to the euler sampler"),
])
def test_spacing_and_gamma_mistakes_are_one_line_usage_errors(files, tmp_path, capsys, args, message):
    model, _, _ = files
    run("txt2img", "--prompt", "a fox", "--model", model, *SIZE, *args, "-o", tmp_path / "x.png", code=2)
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("name, model, settings", [
    ("sd_xl_turbo_1.0_fp16.safetensors", "SDXL-Turbo", {"sampler": "euler_a", "spacing": "trailing", "steps": 1, "cfg": 1.0}),
    ("sd_turbo.safetensors", "SDXL-Turbo", {"sampler": "euler_a", "spacing": "trailing", "steps": 1, "cfg": 1.0}),
    ("sdxl_lightning_4step_lora.safetensors", "SDXL-Lightning", {"sampler": "euler", "spacing": "trailing", "steps": 4, "cfg": 1.0}),
    ("sdxl_lightning_8step.safetensors", "SDXL-Lightning", {"sampler": "euler", "spacing": "trailing", "steps": 8, "cfg": 1.0}),
    ("Hyper-SD15-8steps-lora.safetensors", "Hyper-SD", {"sampler": "euler", "spacing": "trailing", "steps": 8, "cfg": 1.0}),
    ("Hyper-SDXL-8steps-CFG-lora.safetensors", "Hyper-SD", {"sampler": "euler", "spacing": "trailing", "steps": 8, "cfg": 5.0}),
    ("Hyper-SDXL-1step-lora.safetensors", "Hyper-SD", {"sampler": "tcd", "spacing": "lcm", "steps": 1, "cfg": 1.0, "tcd_gamma": 1.0}),
    ("lcm-lora-sdv1-5.safetensors", "LCM-LoRA", {"sampler": "lcm", "spacing": "lcm", "steps": 4, "cfg": 1.0}),
    ("LCM_LoRA_SDXL.safetensors", "LCM-LoRA", {"sampler": "lcm", "spacing": "lcm", "steps": 4, "cfg": 1.0}),
    ("TCD-SD15-LoRA.safetensors", "TCD-LoRA", {"sampler": "tcd", "spacing": "lcm", "steps": 4, "cfg": 1.0, "tcd_gamma": 0.3}),
])
def test_distilled_models_are_recognised_by_their_released_file_names(name, model, settings):
    found = distilled_settings(["v1-5-pruned-emaonly.safetensors", name])
    assert found is not None and (found.model, found.file, found.settings) == (model, name, settings)


@pytest.mark.parametrize("name", ["v1-5-pruned-emaonly.safetensors", "Hyper-SDXL-1step-Unet.safetensors",
                                  "turbocharged-style.safetensors", "lightning-bolt.safetensors"])
def test_other_files_give_no_settings(name):
    assert distilled_settings([name]) is None


def test_completion_offers_the_spacings():
    from ldmtool.diffusion.names import SPACING_NAMES
    from tests.test_help import _complete

    assert _complete("ldmtool txt2img --spacing ") == list(SPACING_NAMES)
    assert _complete("ldmtool img2img --spacing s") == ["sgm_uniform", "simple"]


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_txt2img_few_step_run_equals_diffusers_pipeline_with_that_scheduler(tmp_path, sd1, sampler):
    """A whole `txt2img --sampler lcm|tcd --steps 4 --cfg 1` file against StableDiffusionPipeline with
    LCMScheduler / TCDScheduler (gamma 0.3) at guidance 1 (no unconditional pass there either), same seed:
    the initial latent and every step's fresh noise come from the item's generator in the same order."""
    from diffusers import LCMScheduler, TCDScheduler

    from tests.test_sd_vs_diffusers import PROMPT, SEED, SIZE, diffusers_pipeline

    model, bundle = sd1
    out = tmp_path / "few.png"
    run("txt2img", "--prompt", PROMPT, "--model", model, "-W", SIZE, "-H", SIZE, "--sampler", sampler,
        "--steps", 4, "--cfg", 1, "--seed", SEED, "--quiet", "-o", out)
    ours = pixels(out).astype(np.float64) / 255
    pipe = diffusers_pipeline(bundle)
    scheduler = {"lcm": LCMScheduler, "tcd": TCDScheduler}[sampler]
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)

    def theirs(seed, gamma=0.3):  # the pipeline hands `eta` to TCDScheduler.step (its gamma); LCM takes none
        with torch.no_grad():
            return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=1.0, eta=gamma,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]

    assert np.abs(ours - theirs(SEED)).max() <= 1 / 255
    # controls: another seed's noise gives another image, and so does TCD's gamma
    assert np.abs(ours - theirs(SEED + 1)).max() > 10 / 255
    if sampler == "tcd":
        assert np.abs(ours - theirs(SEED, gamma=0.0)).max() > 10 / 255
