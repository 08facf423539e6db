import subprocess
import sys


def test_importing_packages_is_cheap():
    code = ("import orchestrator, workers, search, db, deploy, common.trial_config, orchestrator.spec, sys; "
            "heavy = [m for m in ('ray', 'torch', 'deepspeed', 'transformers') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout}"
