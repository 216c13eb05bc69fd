"""The libraries users compare us with, behind one interface: train on an XMC-format file, predict top-k.

Each peer trains with its library's own default recipe (what a user gets from its README), on all
threads of the machine, and returns its top-k label ids per test sample; the quality benchmark scores
every system with our metric code, so the figures are comparable. All three read the Extreme
Classification Repository's BoW format through `read_xmc_csr`, which uses the project's one reader of
that format (`pipeline.data.xmc_text.XMCTextReader`).

- Omikuji (Parabel/Bonsai-style label trees, Rust): `omikuji.Model.train_on_data`, its defaults.
- PECOS XR-Linear (libpecos): PIFA label embeddings -> hierarchical k-means indexer -> XLinearModel.
- napkinXC PLT (probabilistic label tree, C++): `napkinxc.models.PLT` with its defaults.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from pipeline.data.xmc_text import XMCTextReader


@dataclass
class XMCMatrix:
    """A whole XMC file in memory: features X [n, num_features] and labels Y [n, num_labels], CSR float32."""

    X: sp.csr_matrix
    Y: sp.csr_matrix


def read_xmc_csr(path: str | os.PathLike) -> XMCMatrix:
    """X and Y of an XMC-format file, rows in file order (the project's reader: same checks, same errors)."""
    feat_ptr, feat_idx, feat_val, lab_ptr, lab_idx = [0], [], [], [0], []
    with XMCTextReader(path) as reader:
        for labels, ids, values in reader:
            feat_idx.append(ids)
            feat_val.append(values)
            lab_idx.append(labels)
            feat_ptr.append(feat_ptr[-1] + len(ids))
            lab_ptr.append(lab_ptr[-1] + len(labels))
        shape_x = (len(feat_ptr) - 1, reader.num_features)
        shape_y = (len(lab_ptr) - 1, reader.num_labels)

    def csr(ptr: list[int], idx: list[np.ndarray], val: list[np.ndarray], shape: tuple[int, int]):
        data = np.concatenate(val).astype(np.float32) if val else np.zeros(0, np.float32)
        cols = np.concatenate(idx).astype(np.int32) if idx else np.zeros(0, np.int32)
        m = sp.csr_matrix((data, cols, np.asarray(ptr, dtype=np.int64)), shape=shape)
        m.sum_duplicates()
        return m

    x = csr(feat_ptr, feat_idx, feat_val, shape_x)
    y = csr(lab_ptr, lab_idx, [np.ones(len(i), np.float32) for i in lab_idx], shape_y)
    y.data[:] = 1.0  # a label listed twice counts once
    return XMCMatrix(x, y)


def _top_k_array(rows: list[list[int]], k: int) -> np.ndarray:
    """Ragged per-sample label lists -> [n, k] int64, padded with -1 (never a hit)."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        r = list(r)[:k]
        out[i, : len(r)] = r
    return out


@dataclass
class PeerResult:
    top_k: np.ndarray  # [n_test, k] label ids in rank order, -1 = none
    train_s: float
    predict_s: float


def run_omikuji(train_file: str, train: XMCMatrix, test: XMCMatrix, k: int, threads: int) -> PeerResult:
    import omikuji

    t0 = time.perf_counter()
    model = omikuji.Model.train_on_data(
        str(train_file), omikuji.Model.default_hyper_param(), n_threads=threads
    )
    t1 = time.perf_counter()
    rows = []
    x = test.X
    for i in range(x.shape[0]):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        pairs = list(zip(x.indices[lo:hi].tolist(), x.data[lo:hi].tolist(), strict=True))
        rows.append([label for label, _ in model.predict(pairs, top_k=k)])
    return PeerResult(_top_k_array(rows, k), t1 - t0, time.perf_counter() - t1)


def run_pecos(train_file: str, train: XMCMatrix, test: XMCMatrix, k: int, threads: int) -> PeerResult:
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    t0 = time.perf_counter()
    label_features = LabelEmbeddingFactory.create(train.Y, train.X, method="pifa")
    chain = Indexer.gen(label_features, threads=threads)
    model = XLinearModel.train(train.X, train.Y, C=chain, threads=threads)
    t1 = time.perf_counter()
    pred = model.predict(test.X, only_topk=k, threads=threads).tocsr()
    rows = []
    for i in range(pred.shape[0]):
        lo, hi = pred.indptr[i], pred.indptr[i + 1]
        order = np.argsort(-pred.data[lo:hi], kind="stable")
        rows.append(pred.indices[lo:hi][order].tolist())
    return PeerResult(_top_k_array(rows, k), t1 - t0, time.perf_counter() - t1)


def run_napkinxc(train_file: str, train: XMCMatrix, test: XMCMatrix, k: int, threads: int) -> PeerResult:
    from napkinxc.models import PLT

    labels = [
        train.Y.indices[train.Y.indptr[i] : train.Y.indptr[i + 1]].tolist() for i in range(train.Y.shape[0])
    ]
    with tempfile.TemporaryDirectory(prefix="napkinxc-") as model_dir:
        t0 = time.perf_counter()
        model = PLT(model_dir, threads=threads, seed=0)
        model.fit(train.X, labels)
        t1 = time.perf_counter()
        rows = model.predict(test.X, top_k=k)
        t2 = time.perf_counter()
    return PeerResult(_top_k_array(rows, k), t1 - t0, t2 - t1)


PEERS = {"omikuji": run_omikuji, "pecos": run_pecos, "napkinxc": run_napkinxc}
"""name -> runner(train_file, train, test, k, threads): every peer gets the same inputs."""
