"""A job's identity across releases: an option added later with a None default must not make the folders of
earlier releases look like other jobs (resume) or other runs (the seed a run without --seed adopts)."""
from ldmtool.runtime.identity import difference, run_id

BEFORE = {"steps": 20, "sampler": "ddim", "cfg": None}


def test_an_option_left_at_none_keeps_the_run_id():
    assert run_id("txt2img", "ab" * 32, {**BEFORE, "lora": None, "refiner_at": None}) == run_id("txt2img", "ab" * 32, BEFORE)
    assert run_id("txt2img", "ab" * 32, {**BEFORE, "refiner_at": 0.8}) != run_id("txt2img", "ab" * 32, BEFORE)
    assert run_id("txt2img", "ab" * 32, {**BEFORE, "steps": 8}) != run_id("txt2img", "ab" * 32, BEFORE)


def test_resume_takes_none_and_absent_alike_and_names_a_real_difference():
    job = {"command": "txt2img", "model_sha256": "ab" * 32, "seed": 1, "key": "k", "data": {},
           "input_sha256": None, "mask_sha256": None}
    earlier = {**job, "options": BEFORE}
    assert difference({**job, "options": {**BEFORE, "hires": None}}, earlier) is None
    assert difference({**job, "options": {**BEFORE, "hires": 2.0}}, earlier) == "--hires differs (null, this run 2.0)"
