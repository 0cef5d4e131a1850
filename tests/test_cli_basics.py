import subprocess
import sys


def test_cli_import_does_not_import_torch():
    code = "import sys, ldmtool.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_without_torch():
    code = (
        "import sys\n"
        "from ldmtool.cli.app import main\n"
        "try:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "ldmtool", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("ldmtool ")
