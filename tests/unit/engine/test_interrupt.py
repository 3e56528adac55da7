"""Ctrl-C in the tools: one line naming what OUTPUT_DIR keeps, exit status 130; adaptation locks its folder."""
import gem_d2  # noqa: F401,I001  (compat shims before detectron2)

import argparse
import os

import pytest
import torch
from torch import nn

from gem_d2.engine import GemCheckpointer
from gem_d2.engine.adaptation import run_adaptation
from gem_d2.engine.interrupt import exit_on_interrupt
from gem_d2.engine.run_lock import OutputDirLock, OutputDirLockedError


def test_ctrl_c_prints_one_line_naming_the_last_complete_checkpoint_and_exits_130(tmp_path, capsys):
    out = str(tmp_path / "run")
    GemCheckpointer(nn.Linear(2, 2), out).save("model_0000004", iteration=4)
    with pytest.raises(SystemExit) as exc:
        with exit_on_interrupt(out):
            raise KeyboardInterrupt
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert err == f"interrupted; OUTPUT_DIR keeps the last complete checkpoint {out}/model_0000004.pth\n"

    with pytest.raises(SystemExit):
        with exit_on_interrupt(lambda: str(tmp_path / "fresh")):  # the folder may only be known later
            raise KeyboardInterrupt
    assert capsys.readouterr().err.strip().endswith("fresh) holds no complete checkpoint yet")
    with exit_on_interrupt(out):  # nothing happens without an interrupt
        torch.zeros(1)


def test_adaptation_refuses_an_output_dir_in_use(tmp_path, tiny_config):
    out = tmp_path / "adapted"
    args = argparse.Namespace(config_file=tiny_config, weights=str(tmp_path / "none.pth"), new_dataset="synth_x_train",
                              new_test=None, shots=None, output_dir=str(out), opts=[])
    with OutputDirLock(str(out)):
        with pytest.raises(OutputDirLockedError, match="is in use by another run"):
            run_adaptation(args)  # before anything is read or written
    assert os.listdir(out) == [".run.lock"]
