"""Hidden commands used only by the test suite (registered when LDMTOOL_TEST_COMMANDS=1).

`_invert` inverts images (only inside the mask when masks are paired) through the full batch runner, so
tests can drive discovery, pairing, output naming, resume, events, the manifest and exit codes through
the real CLI without any model. `LDMTOOL_TEST_SLEEP=SECONDS` makes each item slow (crash tests);
`LDMTOOL_TEST_RENDEZVOUS=FOLDER` makes each item wait until another process has started an item too, so
tests of two runs on one folder know that the runs overlapped.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from ldmtool.cli import options as opt
from ldmtool.cli.common import find_inputs, finish
from ldmtool.cli.shared import task_command
from ldmtool.options import ImageInputs, MaskInputs

if TYPE_CHECKING:
    import numpy as np

    from ldmtool.io.images import LoadedImage
    from ldmtool.runtime.jobs import BaseTask, Job, Output, RunOptions

SLEEP_ENV = "LDMTOOL_TEST_SLEEP"
RENDEZVOUS_ENV = "LDMTOOL_TEST_RENDEZVOUS"
EXAMPLE = "Example: LDMTOOL_TEST_COMMANDS=1 ldmtool _invert photos/ -o out/ --json"


@task_command(model=None)
def invert(
    inputs: opt.Inputs,
    pair_masks: Annotated[bool, typer.Option("--pair-masks", help="Pair each image with its mask.")] = False,
    *,
    mask: MaskInputs,
    images: ImageInputs,
    run: "RunOptions",
) -> None:
    """Invert images (only inside the mask of those that have one): a trivial op for testing the runner."""
    from ldmtool.runtime.runner import run_task

    paired = pair_masks or mask.masks is not None
    discovery = find_inputs(inputs, recursive=images.recursive, pair_masks=paired, masks_dir=mask.masks)
    task = InvertTask(mask_mode=_mask_mode(paired, mask.mask_from_alpha), invert_mask=mask.invert_mask,
                      max_pixels=images.max_pixels)
    finish(run_task(task, discovery, run))


def _mask_mode(paired: bool, from_alpha: bool) -> str:
    return "alpha" if from_alpha else ("file" if paired else "none")


def _invert_task_class() -> Callable[..., BaseTask]:
    from ldmtool.io.images import mask_from_alpha, read_image, read_mask
    from ldmtool.runtime.jobs import BaseTask, Output

    class _InvertTask(BaseTask):
        command = "_invert"

        def __init__(self, *, mask_mode: str, invert_mask: bool, max_pixels: Optional[int]):
            super().__init__(params={"mask_mode": mask_mode, "invert_mask": invert_mask})
            self.mask_mode = mask_mode
            self.invert_mask = invert_mask
            self.max_pixels = max_pixels

        def load(self, job: Job) -> tuple[LoadedImage, Optional[np.ndarray]]:
            assert job.item.path is not None  # discovered items always have a file
            image = read_image(job.item.path, max_pixels=self.max_pixels)
            mask = None
            if self.mask_mode == "file" and job.item.mask is not None:  # no mask: the whole image
                mask = read_mask(job.item.mask, size=image.size, invert=self.invert_mask, max_pixels=self.max_pixels)
            elif self.mask_mode == "alpha" and image.alpha is not None:
                mask = mask_from_alpha(image.alpha, invert=self.invert_mask)
            return image, mask

        def run(self, jobs: list[Job]) -> list[Output]:
            outputs = []
            for job in jobs:
                _meet_another_process()
                time.sleep(float(os.environ.get(SLEEP_ENV, "0") or 0))
                image, mask = job.payload
                inverted = 1.0 - image.rgb
                if mask is not None:
                    inverted = image.rgb + (inverted - image.rgb) * mask[:, :, None]
                extra = {"mask": str(job.item.mask)} if job.item.mask else {}
                outputs.append(Output(image=inverted, alpha=image.alpha, params=extra))
            return outputs

    return _InvertTask


def _meet_another_process(timeout: float = 60.0) -> None:
    folder = os.environ.get(RENDEZVOUS_ENV)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, str(os.getpid())), "w").close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not set(os.listdir(folder)) - {str(os.getpid())}:
        time.sleep(0.01)


def InvertTask(*, mask_mode: str, invert_mask: bool, max_pixels: Optional[int]) -> BaseTask:
    """Built on first use so that registering the command imports neither numpy nor Pillow."""
    return _invert_task_class()(mask_mode=mask_mode, invert_mask=invert_mask, max_pixels=max_pixels)


def register(app: typer.Typer) -> None:
    from ldmtool.cli import help

    app.command("_invert", hidden=True, help=f"{invert.__doc__}\n\n{EXAMPLE}")(invert)
    help.apply(app)  # also when a test registers it late: every command's help is the plain one
