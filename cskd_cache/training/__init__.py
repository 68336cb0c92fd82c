"""Stage two: the student, the CSKD loss, the data path with cached teacher outputs, the training
loop, checkpoints, evaluation, the timm task and the library API (`CachedViews`)."""
