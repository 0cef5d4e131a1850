"""Textual-inversion embeddings (issue 19): an A1111 `.pt` file with a multi-vector embedding, used by name
in a prompt, gives the context diffusers' `load_textual_inversion` + `encode_prompt` gives (test-only
oracle); the other layouts read to the same vectors; `--embeddings-dir` reaches the image."""
import numpy as np
import pytest
import torch
from PIL import Image

from clip_oracles import transformers_clip_tokenizer
from ldmtool.addons.embeddings import load_embeddings, read_embedding
from ldmtool.checkpoints.files import save_safetensors
from ldmtool.cli.app import main
from ldmtool.pipelines.prompt_encoding import PromptEncoder
from test_sd_vs_diffusers import diffusers_pipeline, save_checkpoint

PROMPT = "a photo of fox-style on a table, (fox-style:1.2)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti")
    model = folder / "sd1-tiny.safetensors"
    bundle = save_checkpoint(model)
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5)) * 0.5
    embeddings = folder / "embeddings"
    embeddings.mkdir()
    a1111 = embeddings / "fox-style.pt"  # A1111's layout: one term '*' in string_to_param
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "fox-style",
                "step": 100}, a1111)
    return model, bundle, vectors, a1111


def test_a1111_embedding_matches_diffusers_load_textual_inversion(setup):
    _, bundle, _, a1111 = setup
    pipe = diffusers_pipeline(bundle)
    pipe.tokenizer = transformers_clip_tokenizer()  # a fresh tokenizer: diffusers adds tokens to it
    pipe.load_textual_inversion(str(a1111), token="fox-style")
    plain = "a photo of fox-style on a table"
    with torch.no_grad():
        theirs = pipe.encode_prompt(plain, device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0][0]
    ours = PromptEncoder(bundle.cond_stage, embeddings=[read_embedding(a1111)])(plain)
    assert ours.shape == theirs.shape == (77, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, PromptEncoder(bundle.cond_stage)(plain), atol=1e-3)


def test_embedding_layouts_read_to_the_same_vectors(setup, tmp_path):
    _, _, vectors, a1111 = setup
    save_safetensors({"emb_params": vectors}, tmp_path / "a.safetensors")
    torch.save({"fox": vectors}, tmp_path / "b.pt")  # diffusers' {token: vectors}
    save_safetensors({"clip_l": vectors, "clip_g": torch.zeros(3, 64)}, tmp_path / "c.safetensors")
    for path in [a1111, tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.safetensors"]:
        embedding = read_embedding(path)
        assert torch.equal(embedding.for_width(32), vectors), path
    assert read_embedding(tmp_path / "c.safetensors").for_width(64).shape == (3, 64)  # SDXL's clip_g
    assert [e.name for e in load_embeddings(tmp_path)] == ["a", "b", "c"]


def test_embeddings_dir_reaches_the_image(setup, tmp_path, capsys):
    model, _, _, a1111 = setup

    def run(*extra):
        out = tmp_path / f"{len(extra)}.png"
        try:
            main(["txt2img", "--prompt", PROMPT, "--model", str(model), "-W", "64", "-H", "64", "--steps", "3",
                  "--seed", "2", "--quiet", "-o", str(out), *extra])
        except SystemExit as exit:
            assert not exit.code
        return np.asarray(Image.open(out)).astype(int)

    assert np.abs(run("--embeddings-dir", str(a1111.parent)) - run()).max() > 5
    text = Image.open(tmp_path / "2.png").info["parameters"]
    short = read_embedding(a1111).sha256[:12]
    assert f'TI hashes: "fox-style: {short}"' in text and f'"embed:fox-style": "{short}"' in text
    with pytest.raises(SystemExit) as exit:
        main(["txt2img", "--prompt", "x", "--model", str(model), "--embeddings-dir", str(tmp_path / "none"),
              "--quiet", "-o", str(tmp_path / "x.png")])
    assert exit.value.code == 2 and "not a folder" in capsys.readouterr().err


def _txt2img(model, folder, out, *prompt):
    from clirun import run_cli

    return run_cli("txt2img", *prompt, "--model", model, "-W", 64, "-H", 64, "--steps", 1, "--seed", 3,
                   "--embeddings-dir", folder, "-o", out, "--quiet")


def _bad_files(folder):
    (folder / "notes.pt").write_text("not an embedding, a README renamed")
    save_safetensors({"alpha": torch.zeros(2), "beta": torch.zeros(3)}, folder / "other.safetensors")
    torch.save({"string_to_param": {"*": torch.zeros(76, 32)}}, folder / "long.pt")


def test_files_no_prompt_names_are_left_alone_and_a_used_one_is_exit_2_naming_it(setup, tmp_path):
    model, _, _, a1111 = setup
    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / a1111.name).write_bytes(a1111.read_bytes())
    _bad_files(folder)
    assert _txt2img(model, folder, tmp_path / "ok.png", "--prompt", PROMPT).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    for name, why in [("notes", "notes.pt"), ("other", "other.safetensors: not a textual-inversion"),
                      ("long", "long.pt: 76 vectors, more than the 75 tokens of one CLIP chunk")]:
        prompts.write_text(f"a cat\na {name} fox\n")
        for given in (["--prompt", "a cat", "--negative", name], ["--prompts", prompts]):
            result = _txt2img(model, folder, tmp_path / "out", *given)
            lines = result.stderr.strip().splitlines()
            assert result.exit_code == 2 and len(lines) == 1, result
            assert lines[0].startswith(f"ldmtool: error: {folder / why}"), lines
            assert not (tmp_path / "out").exists()


def test_the_job_holds_only_the_embeddings_its_prompt_uses(setup, tmp_path):
    model, _, vectors, a1111 = setup
    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / a1111.name).write_bytes(a1111.read_bytes())
    out = tmp_path / "fox.png"
    for prompt in (["--prompt", PROMPT], ["--prompts", tmp_path / "lines.txt"]):
        (tmp_path / "lines.txt").write_text(f"{PROMPT}\n")
        assert _txt2img(model, folder, out, *prompt).exit_code == 0
        written = out.stat().st_mtime_ns
        _bad_files(folder)
        torch.save({"string_to_param": {"*": vectors}}, folder / "unused.pt")
        assert _txt2img(model, folder, out, *prompt).exit_code == 0  # done already: the same job
        assert out.stat().st_mtime_ns == written
        torch.save({"string_to_param": {"*": vectors * 2}}, folder / a1111.name)
        again = _txt2img(model, folder, out, *prompt)
        assert again.exit_code == 1 and "its embeddings file content differs" in again.output, again
        out.unlink()
        for path in folder.iterdir():
            path.unlink()
        (folder / a1111.name).write_bytes(a1111.read_bytes())
