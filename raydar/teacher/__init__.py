"""Teachers: the clients that ask them, and the simulated teacher used offline."""

from raydar.teacher.client import TeacherAnswer, TeacherClient, teacher_fingerprint

__all__ = ["TeacherAnswer", "TeacherClient", "teacher_fingerprint"]
