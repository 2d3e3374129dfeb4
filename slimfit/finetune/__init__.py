"""`slimfit finetune` and `slimfit bench`: options (:mod:`.options`), the Trainer-based run (:mod:`.loop`), memory
peaks (:mod:`.meter`) and what a run writes (:mod:`.report`); the tasks live in :mod:`slimfit.tasks`."""
