"""The weight-sync bucket checksum catches real corruption (issue 11, item 6): swapped words or
tensors inside one 8 KiB row, an all-zero buffer, a stale bucket of the same size (earlier index
or earlier weight version), on top of flipped bits; CPU and the int64 wrap-around agree with an
independent Python big-int computation."""
import pytest
import torch

from megatron_dgpo.weight_sync.stream import (CHECK_ROW_WORDS, TAIL, WeightBucket, WeightSyncIntegrityError,
                                              bucket_seed, payload_checksum)

ROW = 8 * CHECK_ROW_WORDS


def _bucket(index=3, version=7, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    payload = rows * ROW
    buf = torch.zeros(payload + TAIL, dtype=torch.uint8)
    # two fp32 "tensors" of 600 values each, then bf16 values: realistic bytes, not random words
    vals = torch.randn(payload // 4, generator=g)
    buf[:payload].view(torch.float32).copy_(vals)
    b = WeightBucket(index, ["t0", "t1"], [buf[:2400].view(torch.float32), buf[2400:4800].view(torch.float32)],
                     buf, payload, version=version)
    b.seal()
    b.verify()
    return b


def _fails(b):
    with pytest.raises(WeightSyncIntegrityError, match="integrity"):
        b.verify()


def test_swapped_words_in_one_row():
    b = _bucket()
    w = b.buffer[:b.payload_bytes].view(torch.int64)
    w[[5, 900]] = w[[900, 5]].clone()  # both in row 0
    _fails(b)


def test_swapped_fp32_values_and_tensors_in_one_row():
    b = _bucket()
    f = b.buffer[:b.payload_bytes].view(torch.float32)
    f[[0, 1]] = f[[1, 0]].clone()  # two values inside one int64 word
    _fails(b)
    b = _bucket()
    t0, t1 = b.tensors[0].clone(), b.tensors[1].clone()  # two tensors of one row swapped
    b.tensors[0].copy_(t1), b.tensors[1].copy_(t0)
    _fails(b)


def test_swapped_rows_and_flipped_high_bit():
    b = _bucket()
    r0 = b.buffer[:ROW].clone()
    b.buffer[:ROW] = b.buffer[ROW:2 * ROW]
    b.buffer[ROW:2 * ROW] = r0
    _fails(b)
    b = _bucket()
    w = b.buffer[:b.payload_bytes].view(torch.int64)
    w[10] ^= -(1 << 63)  # only the top bit: word 0 is blind to it modulo 2**64 for some weights
    _fails(b)


def test_all_zero_buffer_fails():
    b = _bucket()
    b.buffer.zero_()  # nothing arrived: payload and tail both zero
    _fails(b)


def test_stale_bucket_of_the_same_size_fails():
    cur = _bucket(index=3, version=7)
    for idx, ver in ((2, 7), (3, 6)):  # an earlier bucket, the same bucket of the previous sync
        stale = _bucket(index=idx, version=ver, seed=1)
        cur.buffer.copy_(stale.buffer)
        _fails(cur)
    assert len({bucket_seed(i, v, s) for i in range(4) for v in range(4) for s in range(2)}) == 32


def test_swap_of_words_differing_only_in_a_sign_bit():
    # [0.0, 1.0] and [0.0, -1.0] as one int64 word each: they differ by 2**63 only, which any
    # linear sum modulo 2**64 with odd weights misses when swapped; the folded word sees it
    b = _bucket()
    f = b.buffer[:b.payload_bytes].view(torch.float32)
    f[0:2] = torch.tensor([0.0, 1.0])
    f[6:8] = torch.tensor([0.0, -1.0])
    b.seal()
    b.verify()
    w = b.buffer[:b.payload_bytes].view(torch.int64)
    w[[0, 3]] = w[[3, 0]].clone()
    _fails(b)


def test_matches_python_bigint_reference():
    from megatron_dgpo.weight_sync import stream as S

    b = _bucket(rows=2)
    seed = b.seed
    M = (1 << 64) - 1

    def sgn(x):
        x &= M
        return x - (1 << 64) if x >> 63 else x

    words = [int(v) for v in b.buffer[:b.payload_bytes].view(torch.int64).tolist()]
    w0 = S._splitmix(seed) + sum((2 * j + 1) * x for j, x in enumerate(words))
    w1 = S._splitmix(seed ^ 0x5BD1E995) + sum((2 * j + 1) * (x ^ (x >> 32)) for j, x in enumerate(words))
    assert [sgn(w0), sgn(w1)] == payload_checksum(b.buffer[:b.payload_bytes], seed).tolist()
