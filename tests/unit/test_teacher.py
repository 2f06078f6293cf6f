"""The shared EMA teacher: update rule, no gradients, buffers, mode policy, stochastic layers."""

import pytest
import torch
from torch import nn

from ssl.teacher import EMATeacher, TeacherSpec


def make_student() -> nn.ModuleDict:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    return nn.ModuleDict({"backbone": body, "head": nn.Linear(2, 3)})


def test_update_is_momentum_average_of_parameters_and_keeps_buffers() -> None:
    student = make_student()
    teacher = EMATeacher(student, TeacherSpec())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student["backbone"][1].running_mean.fill_(5.0)
    before = [p.clone() for p in teacher.module.parameters()]
    teacher.update(student, 0.996)
    for b, t, s in zip(before, teacher.module.parameters(), student.parameters()):
        assert torch.allclose(t, 0.996 * b + 0.004 * s, atol=1e-7)
    assert torch.all(teacher.module["backbone"][1].running_mean == 0)  # DINO: buffers untouched


def test_buffers_copied_when_asked() -> None:
    student = make_student()
    teacher = EMATeacher(student, TeacherSpec(buffers="copy"))
    student["backbone"][1].running_mean.fill_(5.0)
    teacher.update(student, 0.9)
    assert torch.all(teacher.module["backbone"][1].running_mean == 5.0)


def test_teacher_never_gets_gradients_and_drops_stochastic_layers() -> None:
    student = make_student()
    teacher = EMATeacher(student, TeacherSpec())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert teacher.module["backbone"][2].p == 0.0
    assert student["backbone"][2].p == 0.5


@pytest.mark.parametrize("train_mode", [True, False])
def test_mode_policy(train_mode: bool) -> None:
    wrapper = nn.Module()
    wrapper.teacher = EMATeacher(make_student(), TeacherSpec(train_mode=train_mode))
    wrapper.train()
    assert wrapper.teacher.module["backbone"][1].training is train_mode
    wrapper.eval()
    assert not wrapper.teacher.module["backbone"][1].training
