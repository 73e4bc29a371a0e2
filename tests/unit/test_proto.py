import subprocess
import sys

from tests.integration.harness import ROOT


def test_generated_code_matches_the_protos():
    result = subprocess.run([sys.executable, "tools/gen_proto.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
