"""The labeling app's entry point: `rlhf label serve` runs `streamlit run` on this file.

    RLHF_WORKSPACE=workspace streamlit run labeling_app/app.py     # what `rlhf label serve` does

Every run starts here: it finds the signed-in user (from session state, or after a reload
from the session id in the URL) and shows the login form to anyone else. Only then does
it run the page the URL asks for, from `views/`. (Not `pages/`: Streamlit runs scripts in
a folder of that name on their own, without this entry point, which would skip the login.)
The Admin and Dashboard pages are registered for everyone so that their URLs answer an
annotator with "admins only"; the sidebar links to them for admins only.
"""

from __future__ import annotations

import streamlit as st

from labeling_app import ui

st.set_page_config(page_title="rlhf-suite labeling", page_icon=":material/thumbs_up_down:", layout="centered")

store = ui.store()
rank_page = st.Page("views/rank.py", title="Rank responses", icon=":material/format_list_numbered:",
                    url_path="rank", default=True)
ab_page = st.Page("views/ab.py", title="Blind A/B", icon=":material/compare:", url_path="ab")
admin_page = st.Page("views/admin.py", title="Admin", icon=":material/monitoring:", url_path="admin")
dashboard_page = st.Page("views/dashboard.py", title="Dashboard", icon=":material/insights:", url_path="dashboard")
page = st.navigation([rank_page, ab_page, admin_page, dashboard_page], position="hidden")

user = ui.signed_in_user(store)
if user is None:
    ui.login_form(store)
    st.stop()

with st.sidebar:
    st.markdown(f"Signed in as **{ui.md_escape(user.name)}** ({user.role})")
    keep = {ui.SESSION_PARAM: st.session_state.sid}
    for linked in (rank_page, ab_page) + ((admin_page, dashboard_page) if user.is_admin else ()):
        st.page_link(linked, query_params=keep)
    st.caption("This page's address keeps you signed in: do not share it, and log out when you are done.")
    if st.button("Log out", key="logout"):
        ui.logout(store)
        st.rerun()

page.run()
