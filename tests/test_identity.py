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


# ---------------------------------------------------------------- an option given as its default


DEFAULTS = {"width": 64, "height": 64, "cfg": 1.0}


def test_an_option_given_as_its_default_is_the_option_left_out_and_another_value_is_named():
    job = {"command": "txt2img", "model_sha256": "ab" * 32, "seed": 1, "key": "k", "data": {},
           "input_sha256": None, "mask_sha256": None}
    left_out = {**job, "options": {**BEFORE, "width": None, "height": None, "cfg": None}}
    mixed = {**job, "options": {**BEFORE, "width": 64, "height": None, "cfg": 1}}  # --cfg 1 where 1.0 is the model's
    assert difference(mixed, left_out, DEFAULTS) is None and difference(left_out, mixed, DEFAULTS) is None
    assert difference(mixed, left_out) == "--cfg differs (null, this run 1)"  # without the defaults: as before
    wider = {**job, "options": {**BEFORE, "width": 128, "height": None, "cfg": None}}
    assert difference(wider, left_out, DEFAULTS) == "--width differs (64, this run 128)"  # null shown as it resolves
    assert difference(left_out, wider, DEFAULTS) == "--width differs (128, this run 64)"


def test_every_spelling_of_a_run_has_its_run_id_among_the_run_ids():
    from ldmtool.runtime.resume import Recipes

    def recipes(**options):
        return Recipes("txt2img", "ab" * 32, {**BEFORE, **options}, {}, option_defaults=DEFAULTS)

    mine = recipes(width=None, height=64, cfg=None)
    for spelling in ({"width": 64, "height": None}, {"width": None, "height": None}, {"width": 64, "height": 64, "cfg": 1.0}):
        assert recipes(**spelling).run_id in mine.run_ids
    assert len(mine.run_ids) == 8  # three options, each given or left out
    assert recipes(width=128).run_id not in mine.run_ids
    assert min(recipes(width=64).run_ids) == min(mine.run_ids)  # the seed claim of runs going on together


def test_tasks_report_what_their_model_resolved_options_default_to_before_the_model_loads():
    from ldmtool.options import ModelChoice, SamplingChoice
    from ldmtool.pipelines.engine import Engine
    from ldmtool.pipelines.inpaint import InpaintTask
    from ldmtool.pipelines.sample import SampleTask
    from ldmtool.pipelines.superres import SuperresTask

    def engine(model, **sampling):
        return Engine(ModelChoice(model=model), SamplingChoice(**sampling))

    task = SampleTask(engine("default-sample", steps=3))
    assert task.option_defaults().items() >= {"width": 64, "height": 64, "sampler": "ddim", "steps": 50, "cfg": 1.0}.items()
    assert not hasattr(task.engine, "bundle")  # described from the file's header, not loaded
    superres = SuperresTask(engine("default-superres", sampler="euler"), scale=4).option_defaults()
    assert superres.items() >= {"consistency": True, "colour_fix": False, "steps": 1, "temperature": 0.0,
                                "spacing": "trailing"}.items()
    assert InpaintTask(engine("default-inpaint")).option_defaults()["colour_fix"] is True
