"""Orbax checkpoints of a whole run: train state (params, optimizer, EMAs, step, RNG), every process's
Grain iterator state, and the config, in one step directory under `<workdir>/checkpoints`.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it when every
item is committed), so a run killed mid-save keeps its previous checkpoint and never sees a partial
one. Keeps the latest `keep` plus every `keep_period`-th step. Preemption: SIGTERM (single process)
or JAX's preemption sync point (multi-process, where the coordination service owns the signal) asks
for a save at the next step boundary.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep_policy
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policy

from visaudio_jax.components import CHECKPOINT_ITEMS



class PreemptionWatch:
  """Turns SIGTERM into a flag the training loop polls between steps (the step in flight finishes)."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning('SIGTERM: saving a checkpoint at the next step boundary, then exiting')
    self._event.set()

  def requested(self, manager: ocp.CheckpointManager, step: int) -> bool:
    return self._event.is_set() or (jax.process_count() > 1 and manager.reached_preemption(step))

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def make_manager(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  ckpt = config.checkpoint
  keep = [keep_policy.LatestN(int(ckpt.keep))]
  if ckpt.keep_period:
    keep.append(keep_policy.EveryNSteps(int(ckpt.keep_period)))
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=save_policy.AnySavePolicy([
          save_policy.FixedIntervalPolicy(int(ckpt.every)), save_policy.PreemptionCheckpointingPolicy()]),
      preservation_policy=keep_policy.AnyPreservationPolicy(keep),
      enable_async_checkpointing=bool(ckpt.async_save), create=True)
  handlers = {'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), item_names=CHECKPOINT_ITEMS,
                               item_handlers=handlers, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any,
         config: ml_collections.ConfigDict, force: bool = False) -> bool:
  """Save if the policy (interval, preemption) or `force` says so; returns whether it saved."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
      config=ocp.args.JsonSave(config.to_dict())), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
  """The state at `step` placed as `abstract_state`'s shardings say; `data_iter` (if given) is moved
  to where that checkpoint's iterator was."""
  args = {'state': ocp.args.StandardRestore(abstract_state)}
  if data_iter is not None:
    args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  return manager.restore(step, args=ocp.args.Composite(**args)).state
