"""replfs.meta: the metadata file (format.py), its paths (paths.py), and the
ClusterBitmap serialization it stores.  Fast, no sockets."""

import json
import os
import stat
import struct
import zlib

import pytest

from replfs.core.bitmap import CHUNK, ClusterBitmap
from replfs.meta import format as fmt
from replfs.meta import paths
from replfs.meta.format import AL_CAPACITY, SLOT, Header, MetaError, MetaFile

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE, CS = 1 * GiB + 3 * 64 * KiB, 64 * KiB   # 16387 clusters: not a multiple of 8


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "disk.raw.replfs-meta")


def open_meta(path, **kw):
    kw.setdefault("size", SIZE)
    kw.setdefault("cluster_size", CS)
    return MetaFile.open(path, **kw)


def reopen(m: MetaFile, **kw) -> MetaFile:
    m.close()
    return open_meta(m.path, **kw)


def header_seqs(path):
    """The (seq, crc-valid) of both header slots, read straight from the file."""
    with open(path, "rb") as f:
        raw = f.read(2 * SLOT)
    out = []
    for rec in (raw[:SLOT], raw[SLOT:]):
        magic, crc, _version, seq, _length = struct.unpack_from("<8sIIQI", rec)
        out.append((seq, magic == fmt.HEADER_MAGIC and zlib.crc32(rec[12:]) == crc))
    return out


def make_slot(magic, seq, payload, version=fmt.VERSION) -> bytes:
    """A 4 KiB record as the format note describes it (built independently)."""
    rec = bytearray(SLOT)
    rec[32:32 + len(payload)] = payload
    struct.pack_into("<8sIIQI", rec, 0, magic, 0, version, seq, len(payload))
    struct.pack_into("<I", rec, 8, zlib.crc32(rec[12:]))
    return bytes(rec)


def flip(path, off):
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x5A]))


# -- create / open ----------------------------------------------------------------------
def test_create_then_open(path):
    m = open_meta(path)
    assert m.created
    h = m.header
    assert len(h.node_id) == 16 and int(h.node_id, 16) >= 0
    assert (h.size, h.cluster_size, h.current, h.history, h.clean, h.failover) == \
        (SIZE, CS, 0, [], True, "")
    assert m.nbits == 16387 and m.nbytes == 2049
    assert m.read_bitmap() == bytes(2049) and m.read_al() == []
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == fmt.file_size(SIZE, CS) == 64 * KiB + 2 * (4 * KiB + 4 * KiB)
    assert not os.path.exists(path + ".tmp")
    m2 = reopen(m)
    assert not m2.created and m2.header == h
    m2.close()


def test_create_false_and_stale_tmp(path):
    with pytest.raises(FileNotFoundError):
        open_meta(path, create=False)
    with open(path + ".tmp", "wb") as f:   # a creation that crashed half-way
        f.write(b"junk" * 5000)
    with open_meta(path) as m:
        assert m.created and m.read_bitmap() == bytes(m.nbytes)
    assert not os.path.exists(path + ".tmp")


def test_second_open_is_refused_while_locked(path):
    m = open_meta(path)
    with pytest.raises(MetaError, match="in use"):
        open_meta(path)
    open_meta(path, lock=False).close()
    m.close()
    open_meta(path).close()


def test_mismatch_names_both_values(path):
    open_meta(path).close()
    with pytest.raises(MetaError) as e:
        open_meta(path, size=2 * GiB)
    assert str(SIZE) in str(e.value) and str(2 * GiB) in str(e.value)
    with pytest.raises(MetaError) as e:
        open_meta(path, cluster_size=4 * KiB)
    assert "65536" in str(e.value) and "4096" in str(e.value)


# -- header -------------------------------------------------------------------------------
def test_header_round_trip_and_ab_alternation(path):
    m = open_meta(path)
    assert header_seqs(path) == [(1, True), (0, False)]
    h = m.header
    h.role, h.peer_current, h.checkpoint, h.clean = "primary", 7, 3, False
    h.extra = {"resync_cursor": 12345, "nested": {"a": [1, 2]}}
    m.write_header(h)
    assert m.header == h and m.header is not m.header
    assert header_seqs(path) == [(1, True), (2, True)]
    h.checkpoint = 4
    m.write_header(h)
    assert header_seqs(path) == [(3, True), (2, True)]
    assert m.update(epoch_dirty=True, failover="committing").checkpoint == 4
    assert header_seqs(path) == [(3, True), (4, True)]
    m = reopen(m)
    got = m.header
    assert got.checkpoint == 4 and got.epoch_dirty and got.failover == "committing"
    assert got.extra == {"resync_cursor": 12345, "nested": {"a": [1, 2]}}
    m.close()


def test_header_rejects_bad_values(path):
    with open_meta(path) as m:
        h = m.header
        for change in ({"size": SIZE + 1}, {"cluster_size": 4096}, {"failover": "maybe"},
                       {"current": -1}, {"history": [1, 2, 3, 4, 5]}, {"history": [0]},
                       {"extra": {"big": "x" * SLOT}}):
            bad = h.copy()
            for k, v in change.items():
                setattr(bad, k, v)
            with pytest.raises(ValueError):
                m.write_header(bad)
        assert header_seqs(path) == [(1, True), (0, False)]  # nothing written


def test_new_generation():
    h = Header(node_id="0" * 16, size=1, cluster_size=1)
    g1 = h.new_generation()
    assert g1 == h.current != 0 and h.history == []
    gens = [g1] + [h.new_generation() for _ in range(5)]
    assert len(set(gens)) == 6 and all(0 < g < 1 << 64 for g in gens)
    assert h.current == gens[-1] and h.history == gens[-2:-6:-1]   # newest first, 4 kept


def test_corrupt_newest_header_falls_back(path):
    m = open_meta(path)
    m.update(checkpoint=1)
    m.update(checkpoint=2)             # slot A, seq 3
    m.close()
    flip(path, 100)                    # inside slot A's JSON
    m = open_meta(path)
    assert m.header.checkpoint == 1    # slot B, seq 2
    m.update(checkpoint=5)             # goes into the bad slot A, seq 3
    assert header_seqs(path) == [(3, True), (2, True)]
    assert reopen(m).header.checkpoint == 5
    m.close()


def test_torn_header_write_falls_back(path):
    """Only the start of the new record landed over the older slot."""
    m = open_meta(path)
    m.update(checkpoint=1)             # B, seq 2
    m.update(checkpoint=2)             # A, seq 3
    m.update(checkpoint=3)             # B, seq 4
    newer = m.header
    newer.checkpoint = 4
    m.close()
    rec = make_slot(fmt.HEADER_MAGIC, 5, newer.to_json())
    with open(path, "r+b") as f:       # slot A: the new head + 8 bytes, then the old bytes
        f.write(rec[:40])
    with open_meta(path) as m:
        assert m.header.checkpoint == 3
    with open(path, "r+b") as f:       # the whole record: it wins
        f.write(rec)
    with open_meta(path) as m:
        assert m.header.checkpoint == 4


def test_both_header_slots_corrupt(path):
    m = open_meta(path)
    m.update(checkpoint=1)
    m.close()
    flip(path, 40)
    flip(path, SLOT + 40)
    with pytest.raises(MetaError, match="header: both slots"):
        open_meta(path)
    with open(path, "r+b") as f:
        f.truncate(0)
    with pytest.raises(MetaError, match="both slots"):   # never silently re-created
        open_meta(path)


def test_truncated_file(path):
    open_meta(path).close()
    with open(path, "r+b") as f:
        f.truncate(fmt.file_size(SIZE, CS) - 1)
    with pytest.raises(MetaError, match="truncated"):
        open_meta(path)


def write_slot(path, off, magic, seq, payload, version=fmt.VERSION):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(make_slot(magic, seq, payload, version))


def test_old_header_missing_fields_loads_with_defaults_and_unknown_kept(path):
    open_meta(path).close()
    old = {"node_id": "00112233aabbccdd", "size": SIZE, "cluster_size": CS,
           "current": 99, "a_future_field": [1, "x"]}
    write_slot(path, SLOT, fmt.HEADER_MAGIC, 9, json.dumps(old).encode())
    m = open_meta(path)
    h = m.header
    assert (h.node_id, h.current, h.history, h.failover, h.clean, h.extra) == \
        ("00112233aabbccdd", 99, [], "", True, {})
    m.update(checkpoint=1)
    m = reopen(m)
    assert m.header.unknown == {"a_future_field": [1, "x"]}   # written back as read
    m.close()


def test_newer_format_version_is_refused(path):
    open_meta(path).close()
    write_slot(path, SLOT, fmt.HEADER_MAGIC, 9, b'{"node_id":"x","size":1,"cluster_size":1}',
               version=fmt.VERSION + 1)
    with pytest.raises(MetaError, match="format version"):
        open_meta(path)


# -- bitmap ----------------------------------------------------------------------------------
def test_bitmap_round_trip_and_alternation(path):
    m = open_meta(path)
    bm = ClusterBitmap(m.nbits)
    bm.set_range(0, 3)
    bm.set_range(1000, 9000)
    bm.set_range(m.nbits - 5, m.nbits)
    m.write_bitmap(bm.to_bytes())
    assert m.read_bitmap() == bm.to_bytes()
    bm2 = ClusterBitmap(m.nbits)
    bm2.set_range(7, 8)
    m.write_bitmap(bytearray(bm2.to_bytes()))
    m = reopen(m)
    assert m.read_bitmap() == bm2.to_bytes()
    # the area of the first write (B) still holds it: corrupt the newest (A), reopen
    m.close()
    flip(path, fmt.BITMAP_OFF + SLOT + 1)
    m = open_meta(path)
    assert m.read_bitmap() == bm.to_bytes()
    with pytest.raises(ValueError):
        m.write_bitmap(bytes(m.nbytes - 1))
    m.close()


def test_bitmap_tail_bits_stored_as_zero(path):
    with open_meta(path) as m:
        m.write_bitmap(b"\xff" * m.nbytes)       # 16387 bits: 5 spare bits set
        got = m.read_bitmap()
        assert got[:-1] == b"\xff" * (m.nbytes - 1) and got[-1] == 0b111


def test_bitmap_both_areas_corrupt(path):
    m = open_meta(path)
    m.write_bitmap(b"\x01" * m.nbytes)
    area = fmt._layout(SIZE, CS)[2]
    m.close()
    flip(path, fmt.BITMAP_OFF + SLOT + 10)
    flip(path, fmt.BITMAP_OFF + area + SLOT + 10)
    with pytest.raises(MetaError, match="bitmap: both slots"):
        open_meta(path)


def test_zero_size_image(path):
    with open_meta(path, size=0) as m:
        assert m.nbits == 0 and m.read_bitmap() == b""
        m.write_bitmap(b"")
        m.write_al([1])
    with open_meta(path, size=0) as m:
        assert m.read_al() == [1] and m.read_bitmap() == b""


@pytest.mark.parametrize("nbits", [0, 1, 7, 8, 9, CHUNK * 8 - 1, CHUNK * 8 * 3 + 5])
def test_bitmap_from_bytes(nbits):
    bm = ClusterBitmap(nbits)
    ranges = [(0, min(3, nbits)), (nbits // 2, nbits // 2 + min(9, nbits - nbits // 2)),
              (max(0, nbits - 2), nbits)]
    for a, b in ranges:
        bm.set_range(a, b)
    data = bytearray(bm.to_bytes())
    assert len(data) == (nbits + 7) >> 3
    if nbits & 7:
        data[-1] |= 0xFF & ~((1 << (nbits & 7)) - 1)     # garbage past nbits
    got = ClusterBitmap.from_bytes(nbits, bytes(data))
    assert got.to_bytes() == bm.to_bytes()
    assert got.count == bm.count == sum(1 for i in range(nbits) if bm.test(i))
    assert list(got.set_runs()) == list(bm.set_runs())
    # the summary is right: next_set finds the bits, clear_all clears them all
    assert got.next_set(0, nbits) == bm.next_set(0, nbits)
    if nbits:
        assert got.next_set(nbits // 2, nbits) == bm.next_set(nbits // 2, nbits)
    got.clear_all()
    assert got.count == 0 and got.to_bytes() == bytes(len(data))
    with pytest.raises(ValueError):
        ClusterBitmap.from_bytes(nbits, bytes(len(data) + 1))


def test_bitmap_from_bytes_far_chunk():
    """A bit alone in a far chunk: only a correct summary lets next_set find it."""
    nbits = CHUNK * 8 * 5
    data = bytearray(nbits // 8)
    data[CHUNK * 4 + 17] = 0x20
    got = ClusterBitmap.from_bytes(nbits, data)
    want = (CHUNK * 4 + 17) * 8 + 5
    assert got.count == 1 and got.next_set(0, nbits) == want
    assert got.next_clear(want, nbits) == want + 1
    got.clear_range(0, nbits)
    assert got.count == 0 and got.next_set(0, nbits) == nbits


# -- activity log ---------------------------------------------------------------------------
def test_al_round_trip_capacity_and_alternation(path):
    m = open_meta(path)
    m.write_al([5, 3, 3, 2**32 - 1, 0])
    assert m.read_al() == [0, 3, 5, 2**32 - 1]
    full = range(1000, 1000 + AL_CAPACITY)
    m.write_al(full)
    assert m.read_al() == list(full)
    with pytest.raises(ValueError, match="at most"):
        m.write_al(range(AL_CAPACITY + 1))
    for bad in ([-1], [2**32]):
        with pytest.raises(ValueError):
            m.write_al(bad)
    m = reopen(m)
    assert m.read_al() == list(full)
    m.close()
    flip(path, fmt.AL_OFF + 40)        # the newest is slot A (seqs 1, 2, 3)
    with open_meta(path) as m:
        assert m.read_al() == [0, 3, 5, 2**32 - 1]
        m.write_al([])
        assert m.read_al() == []
    flip(path, fmt.AL_OFF + SLOT + 40)
    flip(path, fmt.AL_OFF + 40)
    with pytest.raises(MetaError, match="activity log: both slots"):
        open_meta(path)


def test_closed(path):
    m = open_meta(path)
    m.close()
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.write_al([1])
    with pytest.raises(ValueError, match="closed"):
        m.read_bitmap()


# -- paths -------------------------------------------------------------------------------------
def test_paths_regular_file(tmp_path):
    img = tmp_path / "img" / "disk0.raw"
    img.parent.mkdir()
    img.write_bytes(b"")
    assert paths.meta_path(str(img)) == f"{img}.replfs-meta"
    assert paths.workdir_path(str(img)) == f"{img}.replfs-work"
    assert paths.meta_path(str(tmp_path / "not-yet.raw")) == f"{tmp_path}/not-yet.raw.replfs-meta"


def test_paths_relative_in_absolute_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.meta_path("d.raw") == f"{tmp_path}/d.raw.replfs-meta"
    assert paths.meta_path("d.raw", "m") == f"{tmp_path}/m/d.raw.replfs-meta"


def test_paths_meta_dir(tmp_path):
    img = "/images/vm1/disk0.raw"
    assert paths.meta_path(img, str(tmp_path)) == f"{tmp_path}/disk0.raw.replfs-meta"
    assert paths.workdir_path(img, str(tmp_path)) == f"{tmp_path}/disk0.raw.replfs-work"
    assert paths.meta_path("/dev/vg0/disk1", str(tmp_path)) == f"{tmp_path}/disk1.replfs-meta"


def test_paths_dev(tmp_path, monkeypatch):
    state = tmp_path / "state"
    monkeypatch.setattr(paths, "STATE_DIR", str(state))
    got = paths.meta_path("/dev/vg0/disk1")
    assert got == f"{state}/dev_vg0_disk1.replfs-meta"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert paths.workdir_path("/dev/mapper/vg-lv") == f"{state}/dev_mapper_vg-lv.replfs-work"
    assert paths.meta_path("/dev/../dev/sda") == f"{state}/dev_sda.replfs-meta"


def test_paths_block_device_outside_dev(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "STATE_DIR", str(tmp_path / "state"))
    node = tmp_path / "blk"
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    except OSError as e:
        pytest.skip(f"mknod of a block device: {e}")
    assert paths.meta_path(str(node)) == \
        f"{tmp_path}/state/{str(node)[1:].replace('/', '_')}.replfs-meta"
