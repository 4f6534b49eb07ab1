"""The embedded Dask cluster and its child processes (real LocalCluster, no mocks)."""
import json
import sys

from nnunetv2_em import engine


def _child_environment(log_file: str, out_file: str) -> None:
    code = f"import json, os; json.dump(dict(os.environ), open({out_file!r}, 'w'))"
    engine.run_child([sys.executable, "-c", code], env=dict(__import__("os").environ), log_file=log_file)


def test_children_of_a_dask_worker_do_not_inherit_the_nanny_limits(tmp_path, monkeypatch):
    # MALLOC_TRIM_THRESHOLD_=65536 from the nanny doubled nnU-Net's CPU epoch time; a user's own setting stays
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    out_file = tmp_path / "env.json"
    with engine.open_client(device="cpu") as client:
        worker_env = client.run(lambda: dict(__import__("os").environ))
        assert all(env.get("MALLOC_TRIM_THRESHOLD_") == "65536" for env in worker_env.values())  # the premise
        client.submit(_child_environment, str(tmp_path / "child.log"), str(out_file),
                      resources={engine.DEVICE: 1}).result()
    child_env = json.loads(out_file.read_text())
    assert "MALLOC_TRIM_THRESHOLD_" not in child_env
    assert "OMP_NUM_THREADS" not in child_env or child_env["OMP_NUM_THREADS"] != "1"
    assert child_env["MKL_NUM_THREADS"] == "3"
