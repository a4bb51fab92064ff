"""Diagnose: a pasted OOM message or log, or an uploaded allocator snapshot, read into numbers and ranked fixes.

For runs oomlens did not record. Nothing is stored: the text is parsed and the snapshot unpickled
in this process, the latter by a loader that refuses any pickle naming code.
"""

import streamlit as st

from app import diagnose_panels as panels
from app import estimates, suggestion_cards
from app.views.oom_message import EXAMPLE, NOT_OOM
from diagnosis.oom_text import parse_oom_messages
from diagnosis.snapshot import SnapshotSummary

KEY = panels.KEY


def _paste_example() -> None:
    st.session_state[KEY + "text"] = EXAMPLE


st.title("Diagnose")
st.caption(
    "For a run oomlens did not record: paste the out-of-memory message (or the whole log), upload the allocator "
    "snapshot, or both. Every number is read back, the arithmetic the message leaves out is done, and the fixes "
    "are ranked by the bytes each saves."
)
paste, upload = st.columns(2)
with paste:
    text = st.text_area(
        "OOM message, traceback or log",
        key=KEY + "text",
        persist_state="session",
        height=220,
        placeholder="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate …",
    )
    st.button("Paste an example message", key=KEY + "example", on_click=_paste_example, icon=":material/content_paste:")
with upload:
    snapshot_file = st.file_uploader(
        f"PyTorch memory snapshot (pickle or gzip, up to {panels.MAX_UPLOAD_MIB} MiB)",
        key=KEY + "snapshot",
        max_upload_size=panels.MAX_UPLOAD_MIB,
        help="written by torch.cuda.memory._dump_snapshot(); read without running any code from it",
    )
with st.expander("Describe the run (optional): each fix's saving becomes an estimate for your config and card"):
    config_yaml, card, torch_version = panels.run_description()

text = (text or "").strip()
if not text and snapshot_file is None:
    st.info(
        "Paste the error from your log (from `Traceback (most recent call last):` to the `out of memory` line), or "
        "upload a snapshot from `torch.cuda.memory._dump_snapshot('snapshot.pickle')`. For a run oomlens recorded, "
        "its post-mortem already holds all this."
    )
    st.stop()

message = None
if text:
    st.subheader("The message")
    messages = parse_oom_messages(text)
    if messages:
        message = panels.message_panel(messages)
    else:
        st.warning(NOT_OOM, icon=":material/help:")

snapshot: SnapshotSummary | None = None
if snapshot_file is not None:
    st.subheader("The snapshot")
    read = panels.read_upload(snapshot_file)
    if isinstance(read, str):
        st.error(f"`{snapshot_file.name}`: {read}", icon=":material/block:")
    else:
        snapshot = read
        panels.snapshot_panel(snapshot)

request = estimates.failed_request(config_yaml, message)
if request:
    st.markdown(f"**What it asked for:** {request}")

if message is not None or snapshot is not None:
    st.subheader("Fixes, best first")
    fixes = estimates.suggestions(
        config_yaml,
        message,
        snapshot.to_json() if snapshot else None,
        card[1] if card else None,
        torch_version,
        card[0] if card else None,
    )
    if fixes:
        suggestion_cards.cards(fixes)
    else:
        st.info("No fix follows from what was given. Describe the run above (its config and card) for estimates.")
    if config_yaml is None:
        st.caption(
            "Savings come from the message and the snapshot alone; describe the run above for each change's "
            "estimated saving on your config."
        )
