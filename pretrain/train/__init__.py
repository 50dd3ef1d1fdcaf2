"""The train stage: the loop under DeepSpeed (``loop``), checkpoints and exact resume (``checkpoint``), the
weights a run leaves (``weights``), the optimizer and schedule (``optim``), activation checkpointing applied
from outside (``activation_checkpointing``) and what a user watches (``monitor``)."""
