//! The console's pages: server-rendered HTML (maud escapes every value it
//! interpolates), one vendored script (htmx, for the live refresh), one
//! stylesheet. Every form that changes something carries the session's
//! CSRF token.

use super::graph::Graph;
use crate::control::{PublisherStatus, StageStatus};
use crate::dlq::{Entry, Filter, Page, Served, Shown};
use flowgate_actors::envelope::Reason;
use maud::{html, Markup, DOCTYPE};

/// A path segment, percent-encoded.
pub(super) fn seg(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn query(pairs: &[(&str, &str)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if !v.is_empty() {
            q.append_pair(k, v);
        }
    }
    q.finish()
}

/// Which top-level page is open.
#[derive(PartialEq, Eq, Clone, Copy)]
pub(super) enum Tab {
    Pipeline,
    DeadLetters,
    None,
}

/// The frame of every page: head, navigation, the signed-in name.
pub(super) fn layout(title: &str, tab: Tab, who: Option<(&str, &str)>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false}"#;
                title { (title) " · flowgate" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/htmx-2.0.4.min.js" defer {}
            }
            body {
                header {
                    strong { "flowgate" }
                    @if let Some((name, csrf)) = who {
                        a href="/ui/pipeline" class=[(tab == Tab::Pipeline).then_some("here")] { "Pipeline" }
                        a href="/ui/dlq" class=[(tab == Tab::DeadLetters).then_some("here")] { "Dead letters" }
                        span class="who" { "signed in as " strong #who { (name) } }
                        form method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The login form.
pub(super) fn login(login_csrf: &str, error: Option<&str>) -> Markup {
    layout(
        "Sign in",
        Tab::None,
        None,
        html! {
            form.login method="post" action="/ui/login" {
                h1 { "Sign in" }
                p.note { "Use a management token (" code { "[management] token_file" } " or " code { "token_env" } ")." }
                @if let Some(e) = error { p.error #login-error { (e) } }
                input type="hidden" name="csrf" value=(login_csrf);
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" autofocus;
                button.primary #sign-in type="submit" { "Sign in" }
            }
        },
    )
}

/// A stage's consumer on a single-active-consumer queue, as the console says it.
fn role_text(role: crate::control::ConsumerRole) -> &'static str {
    match role {
        crate::control::ConsumerRole::Active => "active",
        crate::control::ConsumerRole::Standby => "standby",
    }
}

fn state_badge(s: &StageStatus) -> Markup {
    let state = match s.state {
        crate::control::StageState::Running => "running",
        crate::control::StageState::Paused => "paused",
        crate::control::StageState::Stopped => "stopped",
    };
    html! { span class=(format!("badge {state}")) { (state) } }
}

/// What the live part of the pipeline page shows of one stage.
pub(super) struct StageView {
    pub(super) status: StageStatus,
    /// Deliveries taken per second, over the last seconds; `None` until
    /// two samples exist.
    pub(super) rate: Option<f64>,
    /// The input queue's depth and watermark (`high`, `low`), if sampled.
    pub(super) depth: Option<u64>,
    pub(super) watermark: Option<(u64, u64)>,
}

/// A rate as text.
pub(super) fn rate_text(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{r:.1}/s"),
        None => "–".into(),
    }
}

/// The part of the pipeline page that refreshes itself (htmx, every second).
pub(super) fn live(graph: &Graph, stages: &[StageView], publisher: &PublisherStatus) -> Markup {
    html! {
        div #live hx-get="/ui/pipeline/live" hx-trigger="every 1s" hx-swap="outerHTML" {
            div.graph { (graph.svg()) }
            h2 { "Stages" }
            table #stages {
                thead { tr {
                    th { "stage" } th { "state" } th.num { "rate" } th.num { "in flight / prefetch" }
                    th.num { "workers" } th { "paused by" } th { "input queue" } th.num { "depth" } th.num { "watermark" }
                } }
                tbody {
                    @for v in stages {
                        @let s = &v.status;
                        tr data-stage=(s.name) {
                            td { strong { (s.name) } }
                            td.state {
                                (state_badge(s))
                                @if let Some(role) = s.consumer { " " small.role { (role_text(role)) } }
                            }
                            td.num.rate { (rate_text(v.rate)) }
                            td.num { (s.in_flight) " / " (s.prefetch) }
                            td.num { (s.workers) " (" (s.busy_workers) " busy)" @if s.pinned_workers.is_some() { " pinned" } }
                            td.causes { (s.paused.join(", ")) }
                            td { code { (s.queue) } }
                            td.num { @match v.depth { Some(d) => (d), None => "–" } }
                            td.num { @match v.watermark { Some((h, l)) => { (h) " / " (l) }, None => "–" } }
                        }
                    }
                }
            }
            h2 { "Publisher" }
            table #publisher {
                thead { tr { th { "breaker" } th.num { "spooled" } th.num { "unconfirmed" } th { "broker" } th.num { "rate limit" } th.num { "burst" } } }
                tbody { tr {
                    td { span class=(format!("badge {}", publisher.breaker)) { (publisher.breaker) } }
                    td.num { (publisher.spooled) }
                    td.num { (publisher.unconfirmed) }
                    td { @if publisher.broker_blocked { span.badge.open { "blocked" } } @else { "ok" } }
                    td.num { @if publisher.rate == 0 { "unlimited" } @else { (publisher.rate) "/s" } }
                    td.num { (publisher.burst) }
                } }
            }
        }
    }
}

/// The pipeline page: the live part, then the controls.
pub(super) fn pipeline(
    live_part: Markup,
    stages: &[StageStatus],
    publisher: &PublisherStatus,
    csrf: &str,
    flash: Option<&str>,
) -> Markup {
    html! {
        h1 { "Pipeline" }
        @if let Some(f) = flash { p.flash #flash { (f) } }
        (live_part)
        h2 { "Controls" }
        p.note { "The same calls as " code { "flowgate ctl" } "; each is logged with your token's name." }
        table #controls {
            thead { tr { th { "stage" } th { "intake" } th { "workers" } } }
            tbody {
                @for s in stages {
                    tr data-stage=(s.name) {
                        td { (s.name) }
                        td {
                            form.inline method="post" action=(format!("/ui/stages/{}/pause", seg(&s.name))) {
                                input type="hidden" name="csrf" value=(csrf);
                                button.pause type="submit" { "Pause" }
                            }
                            " "
                            form.inline method="post" action=(format!("/ui/stages/{}/resume", seg(&s.name))) {
                                input type="hidden" name="csrf" value=(csrf);
                                button.resume type="submit" { "Resume" }
                            }
                        }
                        td {
                            form.inline method="post" action=(format!("/ui/stages/{}/concurrency", seg(&s.name))) {
                                input type="hidden" name="csrf" value=(csrf);
                                input type="number" name="workers" min="1" max=(s.prefetch) value=(s.workers) aria-label="workers";
                                button type="submit" name="mode" value="set" { "Set" }
                                button type="submit" name="mode" value="auto" { "Auto" }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Publish rate" }
        form.inline #rate method="post" action="/ui/publisher/rate" {
            input type="hidden" name="csrf" value=(csrf);
            label { "rate/s (0: unlimited) " input type="number" name="rate" min="0" value=(publisher.rate); }
            label { " burst " input type="number" name="burst" min="1" value=(publisher.burst); }
            button type="submit" { "Set" }
        }
    }
}

/// One DLQ on the index page.
pub(super) struct DlqRow {
    pub(super) queue: String,
    pub(super) dlq: String,
    pub(super) kind: &'static str,
    pub(super) depth: Result<u32, String>,
}

/// The dead-letter index: every configured DLQ with its depth.
pub(super) fn dlq_index(rows: &[DlqRow]) -> Markup {
    html! {
        h1 { "Dead letters" }
        table #dlqs {
            thead { tr { th { "dead-letter queue" } th { "of queue" } th { "kind" } th.num { "messages" } } }
            tbody {
                @for r in rows {
                    tr {
                        td { a href=(format!("/ui/dlq/{}", seg(&r.dlq))) { code { (r.dlq) } } }
                        td { code { (r.queue) } }
                        td { (r.kind) @if r.kind != "classic" { span.note { " (not browsable)" } } }
                        td.num { @match &r.depth { Ok(d) => (d), Err(e) => span.error { (e) } } }
                    }
                }
            }
        }
    }
}

/// The list of one DLQ: filters, the page, actions on a selection or the filter.
pub(super) fn dlq_list(
    page: &Result<(Page, Served), String>,
    queue: &str,
    filter: &Filter,
    page_no: usize,
    csrf: &str,
) -> Markup {
    let reason = filter.reason.clone().unwrap_or_default();
    let stage = filter.stage.clone().unwrap_or_default();
    let search = filter.search.clone().unwrap_or_default();
    let link = |p: usize| {
        format!(
            "/ui/dlq/{}?{}",
            seg(queue),
            query(&[
                ("reason", &reason),
                ("stage", &stage),
                ("search", &search),
                ("page", &p.to_string())
            ])
        )
    };
    html! {
        h1 { "Dead letters in " code { (queue) } }
        form.filters #filters method="get" action=(format!("/ui/dlq/{}", seg(queue))) {
            label { "reason"
                select name="reason" #reason {
                    option value="" { "any" }
                    @for r in Reason::ALL {
                        option value=(r.as_str()) selected[reason == r.as_str()] { (r.as_str()) }
                    }
                    @for r in ["delivery-limit", "rejected", "expired", "maxlen"] {
                        option value=(r) selected[reason == r] { (r) " (broker)" }
                    }
                    @if !reason.is_empty() && Reason::parse(&reason).is_none() && !["delivery-limit", "rejected", "expired", "maxlen"].contains(&reason.as_str()) {
                        option value=(reason) selected { (reason) }
                    }
                }
            }
            label { "stage" input type="text" name="stage" value=(stage); }
            label { "message id or body text" input #search type="search" name="search" value=(search); }
            button.primary #apply-filter type="submit" { "Filter" }
        }
        @match page {
            Err(e) => { p.error #dlq-error { (e) } }
            Ok((p, served)) => {
                p.note #summary data-served=(served_kind(served)) {
                    (p.depth) " in the queue; "
                    @if p.entries.is_empty() { "no match" } @else {
                        "showing matches " (p.offset + 1) "–" (p.offset + p.entries.len())
                    }
                    @match served {
                        Served::Index { age, indexed, rereading } => {
                            " (from the index of " (indexed) " dead letters read " (age.as_secs()) " s ago, checked against the queue now; no message held for this page"
                            @if let Some(why) = rereading { "; being read again because " (why) }
                            ") "
                        }
                        Served::Pending { read, depth, why } => {
                            " (this page lies past what the read indexing the queue has reached: " (read) " of " (depth) " read so far; indexing because " (why) "; the page reloads itself in a second) "
                            meta http-equiv="refresh" content="1";
                            a #reload href=(link(page_no)) { "reload" } " "
                        }
                        Served::Building { read, depth, why } => {
                            " (from the read that is indexing the queue: " (read) " of " (depth) " read so far; indexing because " (why) ") "
                        }
                        Served::Scan { why } => {
                            " (read " (p.examined) " in " (p.held_ms) " ms, given back in order; not from the index: " (why) ")"
                            @if !p.complete { " — the read stopped at its time limit: refine the filter" }
                            " "
                        }
                    }
                    a #reread href=(format!("{}&reread=1", link(page_no))) { "read the queue again" }
                }
                form #selection method="post" action=(format!("/ui/dlq/{}/confirm", seg(queue))) {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="scope" value="selection";
                    table #dead-letters {
                        thead { tr {
                            th { "" } th { "#" } th { "message id" } th { "stage" } th { "reason" } th.num { "attempts" }
                            th { "first death" } th { "last death" } th { "body" }
                        } }
                        tbody {
                            @for e in &p.entries { (entry_row(e, queue)) }
                        }
                    }
                    (action_buttons("selected"))
                }
                p {
                    @if page_no > 1 { a #prev href=(link(page_no - 1)) { "← previous" } " " }
                    @if p.more { a #next href=(link(page_no + 1)) { "next →" } }
                }
                @if !p.entries.is_empty() {
                    form #by-filter method="post" action=(format!("/ui/dlq/{}/confirm", seg(queue))) {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="scope" value="filter";
                        input type="hidden" name="reason" value=(reason);
                        input type="hidden" name="stage" value=(stage);
                        input type="hidden" name="search" value=(search);
                        (action_buttons(if filter.is_empty() { "every one in the queue" } else { "every match of the filter" }))
                    }
                }
            }
        }
    }
}

fn served_kind(s: &Served) -> &'static str {
    match s {
        Served::Index { .. } => "index",
        Served::Building { .. } => "building",
        Served::Pending { .. } => "pending",
        Served::Scan { .. } => "scan",
    }
}

fn action_buttons(scope: &str) -> Markup {
    html! {
        div.actions {
            span { "With " (scope) ":" }
            button type="submit" name="action" value="replay" { "Replay" }
            span.note { "or to" }
            input type="text" name="exchange" placeholder="exchange" aria-label="exchange";
            input type="text" name="routing_key" placeholder="routing key" aria-label="routing key";
            button type="submit" name="action" value="replay_to" { "Replay there" }
            button.danger type="submit" name="action" value="delete" { "Delete" }
        }
    }
}

fn entry_row(e: &Entry, queue: &str) -> Markup {
    html! {
        tr data-id=(e.id) {
            td { input type="checkbox" name="ids" value=(e.id) aria-label="select"; }
            td.num { (e.position) }
            td { a.open href=(format!("/ui/dlq/{}/m/{}", seg(queue), seg(&e.id))) {
                code { @match &e.message_id { Some(m) => (m), None => "(none)" } }
            } }
            td { (e.stage) }
            td.reason { span.badge { (e.reason) } }
            td.num { @match e.attempts { Some(a) => (a), None => "–" } }
            td { (e.first_death.as_deref().unwrap_or("–")) }
            td { (e.last_death.as_deref().unwrap_or("–")) }
            td.preview.mono title=(e.preview) { (e.preview) }
        }
    }
}

/// A dead letter's page: summary, properties, headers, body, actions.
pub(super) fn dlq_message(
    queue: &str,
    id: &str,
    shown: &Result<Vec<Shown>, String>,
    csrf: &str,
) -> Markup {
    html! {
        p { a href=(format!("/ui/dlq/{}", seg(queue))) { "← " (queue) } }
        @match shown {
            Err(e) => { p.error { (e) } }
            Ok(v) if v.is_empty() => { p.error #gone { "No dead letter " code { (id) } " in " (queue) " (replayed or deleted?)." } }
            Ok(v) => {
                h1 { "Dead letter " code { (id) } }
                @if v.len() > 1 { p.note { (v.len()) " messages share this id; actions apply to each." } }
                @for s in v {
                    @let e = &s.entry;
                    dl.kv #summary {
                        dt { "message id" } dd #message-id { code { (e.message_id.as_deref().unwrap_or("(none)")) } }
                        dt { "position" } dd { (e.position) }
                        dt { "reason" } dd #reason { (e.reason) }
                        dt { "stage" } dd { (e.stage) }
                        dt { "attempts" } dd { @match e.attempts { Some(a) => (a), None => "–" } }
                        dt { "first death" } dd { (e.first_death.as_deref().unwrap_or("–")) }
                        dt { "last death" } dd { (e.last_death.as_deref().unwrap_or("–")) }
                        dt { "origin" } dd #origin { @match &e.origin {
                            Some((x, k)) => { "exchange " code { (x) } ", routing key " code { (k) } }
                            None => "unknown (replay it to a destination you name)"
                        } }
                        @if let Some(err) = &e.error { dt { "error" } dd { code { (err) } } }
                    }
                    h2 { "Properties" }
                    table.kv { tbody { @for (k, val) in &s.properties { tr { th { (k) } td { code { (val) } } } } } }
                    h2 { "Headers" }
                    table.kv #headers { tbody { @for (k, val) in &s.headers { tr { th { code { (k) } } td { code { (val) } } } } } }
                    h2 { "Body " span.note { "(" (format!("{:?}", s.body.kind).to_lowercase()) ", " (s.body.size) " bytes" @if s.body.truncated { ", cut" } ")" } }
                    pre #body { (s.body.shown) }
                }
                form #one method="post" action=(format!("/ui/dlq/{}/confirm", seg(queue))) {
                    input type="hidden" name="csrf" value=(csrf);
                    input type="hidden" name="scope" value="selection";
                    input type="hidden" name="ids" value=(id);
                    (action_buttons("this dead letter"))
                }
            }
        }
    }
}

/// What an action is about to do, for the operator to confirm.
pub(super) struct Pending<'a> {
    pub(super) queue: &'a str,
    pub(super) action_text: String,
    pub(super) scope_text: String,
    /// Matches counted now (at most the read's bound).
    pub(super) matched: Result<(u64, bool), String>,
    /// The form fields to send again with `confirm`.
    pub(super) fields: Vec<(String, String)>,
}

/// The confirmation page.
pub(super) fn confirm(p: &Pending<'_>, csrf: &str) -> Markup {
    html! {
        h1 { "Confirm" }
        p #what { strong { (p.action_text) } " — " (p.scope_text) " in " code { (p.queue) } "." }
        @match &p.matched {
            Ok((n, complete)) => p #count { (n) " dead letter" @if *n != 1 { "s" } " match now" @if !complete { " (at least: the count stopped at its time limit)" } "." }
            Err(e) => p.error { (e) }
        }
        p.note { "A replay is confirmed by the broker before the dead letter is removed; one that fails stays. Your token's name is logged with the action." }
        form #confirm method="post" action=(format!("/ui/dlq/{}/apply", seg(p.queue))) {
            input type="hidden" name="csrf" value=(csrf);
            @for (k, v) in &p.fields { input type="hidden" name=(k) value=(v); }
            button.primary #do-it type="submit" { "Confirm" }
            " "
            a href=(format!("/ui/dlq/{}", seg(p.queue))) { "Cancel" }
        }
    }
}

/// What an action did.
pub(super) fn done(
    queue: &str,
    action_text: &str,
    r: &Result<crate::dlq::ActionReport, String>,
) -> Markup {
    html! {
        h1 { "Done" }
        @match r {
            Ok(r) => {
                p #result {
                    (action_text) ": " strong #done-count { (r.done) } " done"
                    @if r.failed > 0 { ", " (r.failed) " failed (left in the queue)" }
                    @if r.no_origin > 0 { ", " (r.no_origin) " without a known origin (left in the queue)" }
                    " of " (r.matched) " matched (" (r.examined) " read)."
                    @if !r.complete { " The read stopped at its time limit: run it again for the rest." }
                }
            }
            Err(e) => p.error #result { (e) }
        }
        p { a #back href=(format!("/ui/dlq/{}", seg(queue))) { "← back to " (queue) } }
    }
}
