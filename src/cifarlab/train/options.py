"""How a run is carried out, as opposed to what it learns (that is the :class:`~cifarlab.recipes.Recipe`).

Each :class:`RunOptions` field carries its command-line help, bounds and choices, its command-line default
(where it differs from the library's), and whether the command that resumes an interrupted run repeats
it: the CLI's options and the "Continue with: ..." hint are both generated from these fields, so an
option added here is offered and carried over without further code.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..precision import PRECISIONS

_UNSET = object()


def run_option(default, help: str = "", bounds: tuple | None = None, choices: tuple | None = None,
               cli_default=_UNSET, resume: bool = True, hidden: bool = False, negative: str = "",
               cli: bool = True):
    """``resume``: repeat it in the resume command when it differs from the CLI default; ``negative``: the
    option is given as this ``--no-...`` flag (a boolean that is on by default); ``cli=False``: an object
    only the library passes (no command-line option)."""
    return field(default=default, metadata={"help": help, "bounds": bounds, "choices": choices, "resume": resume,
                                            "cli_default": default if cli_default is _UNSET else cli_default,
                                            "hidden": hidden, "negative": negative, "cli": cli})


@dataclass
class RunOptions:
    device: str | None = run_option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    resume: bool = run_option(False, "continue the run NAME from its last good checkpoint, with its own recipe, "
                              "model and data (options given must agree with them)", resume=False)
    checkpoint_every: int = run_option(0, "also checkpoint every N steps (default: every epoch only)",
                                       bounds=(0, 10 ** 9))
    keep_checkpoints: int = run_option(2, "how many of the newest checkpoints to keep (default: 2)",
                                       bounds=(1, 10_000))
    precision: str = run_option("auto", "bf16 or fp16 autocast (fp16 with a gradient scaler), or fp32 (default "
                                "auto: bf16 on CUDA compute capability >= 8.0 and on CPUs with native bf16, fp16 on "
                                "older GPUs, else fp32)", choices=PRECISIONS)
    threads: int | None = run_option(None, "a fixed count of CPU threads: bitwise-repeatable runs (default: "
                                     "adaptive, up to all cores)", bounds=(1, 1024))
    adaptive_threads: bool = run_option(False, "CPU, without --threads: time the thread counts as the run goes and "
                                        "use fewer threads when other processes compete for the cores (default: on; "
                                        "results then vary in the last bits)", cli_default=True)
    compile: bool = run_option(False, "torch.compile the model (measure first: see bench/)")
    tensorboard: bool = run_option(False, "also write TensorBoard event files")
    progress: bool = run_option(True, "no progress bars (off anyway when stderr is not a terminal)", resume=False,
                                negative="--no-progress")
    diagnose: bool = run_option(True, "no diagnosis of the training curves at the end", resume=False,
                                negative="--no-diagnosis")
    max_steps: int | None = run_option(None, "stop after N optimizer steps in this call (tests, benchmarks)",
                                       bounds=(1, 10 ** 9), resume=False, hidden=True)
    channels_last: bool | None = run_option(None, "channels-last memory format (default: on a CPU)", resume=False,
                                            hidden=True)
    trial: object = run_option(None, "a hyperparameter-search trial (Optuna's report/should_prune) that each "
                               "epoch's validation accuracy is reported to and that may stop the run "
                               "(cifarlab.sweep)", resume=False, cli=False)

    def validate(self) -> "RunOptions":
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if meta["choices"] and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, not {value!r}")
            if meta["bounds"] and not meta["bounds"][0] <= value <= meta["bounds"][1]:
                raise ValueError(f"{f.name} must be in {meta['bounds'][0]}..{meta['bounds'][1]}, not {value!r}")
        return self

    def resume_flags(self) -> list[str]:
        """The flags that make a resumed run behave as this one: each resumable option away from its CLI
        default. A fixed thread count keeps the resumed run bitwise equal to an uninterrupted one."""
        flags: list[str] = []
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if not meta["resume"] or value == meta["cli_default"] or (f.name == "adaptive_threads" and self.threads):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                flags += [flag, str(value)]
        return flags
