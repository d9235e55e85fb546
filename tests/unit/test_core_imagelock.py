"""QEMU-style image locks between two open files of one image (OFD locks
conflict between open file descriptions, even in one process)."""

from __future__ import annotations

import os

import pytest

from replfs.core.imagelock import ImageLocked, lock_image


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    a = os.open(path, os.O_RDWR)
    b = os.open(path, os.O_RDWR)
    try:
        lock_image(a, str(path))
        with pytest.raises(ImageLocked, match="write"):
            lock_image(b, str(path))
        os.close(a)
        a = -1
        lock_image(b, str(path))  # the first one's locks went with its close
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)


def test_a_reader_that_denies_nothing_coexists_with_a_writer(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    a = os.open(path, os.O_RDWR)
    b = os.open(path, os.O_RDONLY)
    try:
        lock_image(a, str(path))
        lock_image(b, str(path), uses=(0,), denies=())  # as `qemu-img info` does
        c = os.open(path, os.O_RDWR)
        try:  # but a reader that denies writes conflicts with the writer
            with pytest.raises(ImageLocked):
                lock_image(c, str(path), uses=(0,), denies=(1,))
        finally:
            os.close(c)
    finally:
        os.close(a)
        os.close(b)
