"""Launch: a run from a form, checked as the CLI checks it and started as the CLI starts it.

`?setup=scenario-1` opens on a common setup; `?from=RUN` on a past run's config, to edit and run again.
"""

import streamlit as st
import yaml

from app import data, launching, nav
from app.launch_fields import KEY, data_section, keep_targets_valid, lora_section, memory_section, model_section
from app.launch_fields import train_section as training_section
from app.views import launch_form as form
from trainer.config import ConfigError, ConfigIssue, RunConfig, runner_issues, validate_config

_BASE = "launch.base"  # the config the form edits, for the keys it has no widget for
_ORIGIN = "launch.origin"  # what the form was loaded from: ("setup", slug) or ("from", run id)


def _load(config: dict, origin: tuple[str, str]) -> None:
    st.session_state[_BASE] = config
    st.session_state[_ORIGIN] = origin
    for name, value in form.form_values(config).items():
        st.session_state[KEY + name] = value


def _choose_setup() -> None:
    slug = st.session_state[KEY + "setup"]
    _load(form.SETUPS_BY_SLUG[slug].config(), ("setup", slug))
    st.query_params.pop("from", None)
    st.query_params["setup"] = slug


def _requested_origin(url: str) -> tuple[str, str]:
    """What the URL asks the form to start from; an unknown setup or run falls back to the first setup."""
    wanted_run = st.query_params.get("from")
    if wanted_run is not None:
        run = data.run(url, int(wanted_run)) if wanted_run.isdigit() else None
        if run is not None:
            return ("from", str(run.id))
        st.warning(f"There is no run {wanted_run} to start from; showing a common setup instead.")
    slug = st.query_params.get("setup", form.SETUPS[0].slug)
    if slug not in form.SETUPS_BY_SLUG:
        st.warning(f"There is no setup {slug!r}; showing {form.SETUPS[0].title!r}.")
        slug = form.SETUPS[0].slug
    return ("setup", slug)


def _start_form(url: str) -> None:
    origin = _requested_origin(url)
    if st.session_state.get(_ORIGIN) != origin:
        if origin[0] == "from":
            run = data.run(url, int(origin[1]))
            _load(run.config, origin)
        else:
            _load(form.SETUPS_BY_SLUG[origin[1]].config(), origin)
            st.session_state[KEY + "setup"] = origin[1]
    # A widget Streamlit forgot (a page switch before it persisted) starts again from the base config.
    for name, value in form.form_values(st.session_state[_BASE]).items():
        st.session_state.setdefault(KEY + name, value)
    st.session_state.setdefault(KEY + "setup", form.SETUPS[0].slug)
    st.session_state.setdefault(KEY + "name", "")
    keep_targets_valid()


def _check() -> tuple[dict, RunConfig | None, list[ConfigIssue], list[ConfigIssue]]:
    """The form's config and its problems: invalid anywhere, or valid but refused by the runner on this machine."""
    values = {name: st.session_state[KEY + name] for name in form.NAMES}
    raw = form.config_from_form(values, st.session_state[_BASE])
    try:
        cfg = validate_config(raw)
    except ConfigError as error:
        return raw, None, error.issues, []
    return raw, cfg, [], runner_issues(cfg)


def _setup_picker(url: str) -> None:
    st.selectbox(
        "Start from a common setup",
        [setup.slug for setup in form.SETUPS],
        format_func=lambda slug: form.SETUPS_BY_SLUG[slug].title,
        key=KEY + "setup",
        on_change=_choose_setup,
    )
    kind, value = st.session_state[_ORIGIN]
    if kind == "from":
        run = data.run(url, int(value))
        st.info(f"Editing the config of run {value}" + (f" ({run.name})" if run and run.name else "") + ".")
    else:
        st.caption(form.SETUPS_BY_SLUG[value].description)


def _launch(url: str, cfg: RunConfig, name: str) -> None:
    with st.spinner("Starting the trainer…"):
        started = launching.start_run(cfg, url, name=name or None)
    if started.run_id is None:
        st.error(started.message)
        return
    data.forget()
    st.switch_page(nav.RUN.path, query_params={"run": started.run_id})


url = data.open_database()
st.title("Launch")
st.caption("Every knob of a run config, checked as `python -m trainer run` checks it and started the same way.")
_start_form(url)
raw, cfg, issues, refused = _check()
errors, refusals = form.issues_by_field(issues), form.issues_by_field(refused)
_setup_picker(url)
model_section(errors, refusals)
lora_section(errors, refusals)
data_section(errors, refusals)
training_section(errors, refusals)
memory_section(errors, refusals)

st.subheader("Start")
name = st.text_input("Run name (optional)", key=KEY + "name", persist_state="session").strip()
for message in errors.get("", []):
    st.error(message, icon=":material/error:")
for message in refusals.get("", []):
    st.warning(f"The runner refuses this here: {message}", icon=":material/block:")
if issues:
    st.error(f"Not launched: {len(issues)} problem(s) above, each under its field.")
elif refused:
    st.warning(launching.refusal(cfg))
launch = st.button(
    "Launch", type="primary", icon=":material/rocket_launch:", disabled=bool(issues or refused), key=KEY + "go"
)
# A disabled button cannot be clicked in a browser; the check stands for any other way in.
if launch and cfg is not None and not refused:
    _launch(url, cfg, name)

command, config_file = st.columns(2)
with command:
    st.markdown("**The same run from a terminal**")
    st.code(form.cli_command(raw, name or None), language="bash")
with config_file:
    st.markdown("**As a config file** (`--config FILE`)")
    st.code(cfg.to_yaml() if cfg is not None else yaml.safe_dump(raw, sort_keys=False), language="yaml")
