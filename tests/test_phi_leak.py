"""No protected health information leaves the input (issue 13 item 3): DICOM files carrying known fake PHI (patient
name, id, birth date, accession number used as the label CSV's key, study date, institution) go through the whole
pipeline (their patient folders named after the patient, as some PACS exports do, with privacy.hash_paths=true), then
every byte it wrote (the MLflow store: sqlite file and artifacts; the Petastorm folder; the Hydra
output folder; Spark's leftovers) and its captured output are searched for each string, as bytes and case-folded:
zero hits. The search is proved able to find them in the input files (positive control). The PHI key
(privacy.phi_key, given on the command line) must not be written anywhere either."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medical_files import FAKE_PHI, dicom_set
from medspark.data import phi

SALT = "S4lt-of-the-test-q9z"
NEEDLES = [*FAKE_PHI.values(), SALT]  # each 8+ characters: no chance match in binary files


def hits(folder: Path, needles, skip: Path | None = None) -> dict[str, list[str]]:
    """needle -> the files under `folder` (but `skip`) whose bytes contain it, exactly or case-folded."""
    found: dict[str, list[str]] = {}
    wanted = [(n, n.encode(), n.lower().encode()) for n in needles]
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink() or (skip and skip in path.parents):
            continue
        data = path.read_bytes()
        low = data.lower()
        for name, exact, folded in wanted:
            if exact in data or folded in low:
                found.setdefault(name, []).append(str(path.relative_to(folder)))
    return found


@pytest.mark.slow
def test_fake_phi_never_reaches_mlflow_petastorm_logs_or_outputs(tmp_path):
    inputs = tmp_path / "input"
    folder = f"{FAKE_PHI['PatientName']}_{{:03d}}"  # patient folders named after the patient: privacy.hash_paths
    dicom_set(inputs, classes=("glioma", "notumor"), per_class=12, size=32, per_patient=3, real=True, phi=True,
              labels_csv="labels.csv", folder=folder)
    broken = inputs / "glioma" / folder.format(99) / "im99999.dcm"  # rejected: rejected.csv and a log line
    broken.parent.mkdir()
    broken.write_bytes(b"DICM? no: a truncated export")
    control = hits(inputs, NEEDLES[:-1])
    assert set(control) == set(NEEDLES[:-1]) and len(control["PHI-ID-93817"]) == 24, "the search finds them"
    assert sum(FAKE_PHI["PatientName"] in str(p) for p in inputs.rglob("*.dcm")) == 25

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    env.pop("MEDSPARK_PHI_KEY", None)
    cmd = [sys.executable, "-m", "medspark.train", "dataset=dicom", f"dataset.root={inputs}",
           "dataset.labels_csv=labels.csv", "dataset.key=AccessionNumber", "preprocess.image_size=32",
           "train.epochs=1", "train.batch_size=8", "split.val=0.25", "split.test=0.25", "cluster.cores=2",
           f"privacy.phi_key={SALT}", "privacy.hash_paths=true", f"paths.work_dir={tmp_path}/work",
           f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
           f"tracking.artifact_location={tmp_path}/artifacts", f"hydra.run.dir={tmp_path}/outputs"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=1200)
    (tmp_path / "captured.log").write_bytes(res.stdout + b"\n" + res.stderr)
    assert res.returncode == 0, res.stderr[-4000:].decode(errors="replace")

    written = hits(tmp_path, NEEDLES, skip=inputs)
    assert written == {}, f"PHI or the PHI key found in what the run wrote: {written}"
    # what was searched: the store, the Petastorm rows (with their pseudonymous patients), the Hydra folder
    assert (tmp_path / "mlruns.db").stat().st_size > 0 and any((tmp_path / "artifacts").rglob("*.keras"))
    assert any((tmp_path / "work").rglob("*.parquet")) and any((tmp_path / "outputs" / ".hydra").glob("*.yaml"))
    assert b"labels.csv:row" in b"".join(p.read_bytes() for p in (tmp_path / "work").rglob("rejected.csv")), \
        "the study without a file is rejected by its row number"
    import pyarrow.parquet as pq

    shown = {v for f in (tmp_path / "work").rglob("*.parquet") for v in pq.read_table(f, columns=["path"])["path"]
             .to_pylist()}
    assert len(shown) == 24 and all(re.fullmatch(r"file-[0-9a-f]{16}\.dcm", v) for v in shown), sorted(shown)[:3]
    rejected = b"".join(p.read_bytes() for p in (tmp_path / "work").rglob("rejected.csv")).decode()
    assert phi.shown_path(str(broken), SALT.encode()) in rejected, "the broken file: rejected, by its pseudonym"
