# Sourced by scripts/test.sh and scripts/demo.sh: create and activate .venv, install pinned deps once.
# torch 2.14.1 + torchvision 0.29.1 is the pair seen to import together here (the CPU torch 2.13.0 wheel has no
# working torchvision beside it). webdataset 0.2.86 is the release OpenCLIP's own trainer pins; we test with it.
# Works from any folder: the venv is the checkout's .venv, wherever the caller stands.
CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ ! -x "$CHECKOUT/.venv/bin/python" ]; then
    python3 -m venv "$CHECKOUT/.venv"
fi
# shellcheck disable=SC1091
source "$CHECKOUT/.venv/bin/activate"
stamp=$CHECKOUT/.venv/.clip_glofnd_installed
if [ ! -f "$stamp" ] || [ "$CHECKOUT/setup.cfg" -nt "$stamp" ] \
        || [ "$CHECKOUT/scripts/setup_env.sh" -nt "$stamp" ]; then
    python -m pip install -q torch==2.14.1 torchvision==0.29.1
    python -m pip install -q "webdataset==0.2.86" -e "$CHECKOUT[test]"
    touch "$stamp"
fi
export PYTHONHASHSEED=0
