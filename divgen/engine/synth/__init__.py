"""``divgen synth``: a labelled dataset from a task file, append-only and resumable.

One file per concern (read in this order):

* ``task.py``     — the task file: schema, defaults, validation (``load_task``, ``task_from_dict``);
* ``few_shot.py`` — few-shot sources: labelled CSV/JSONL files, AG News text repair, the pool split;
* ``prompts.py``  — which examples a row shows and the prompt it gets;
* ``plan.py``     — groups of slots (computed lazily), the decode rows and guidance of a batch;
* ``output.py``   — the output protocol: records, sidecar, fingerprint, resume checks;
* ``clean.py``    — generated ids -> one clean line of text;
* ``job.py``      — ``run_synth``: prepare, plan, decode batch by batch (``decode_batch``), append.

Importing this package does not import torch.
"""
from divgen.engine.synth.job import DEFAULT_BATCH_ROWS, SynthReport, run_synth
from divgen.engine.synth.task import METHODS, FewShot, Label, Sampling, Task, load_task, task_from_dict

__all__ = ["DEFAULT_BATCH_ROWS", "METHODS", "FewShot", "Label", "Sampling", "SynthReport", "Task", "load_task",
           "run_synth", "task_from_dict"]
