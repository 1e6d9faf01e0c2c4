//! The pipeline as a graph, from the running config: exchanges → (bindings)
//! → queues → stages → (outputs) → exchanges, and each queue's dead
//! letters → its DLQ. Laid out left to right in columns by distance from
//! the sources (nodes nothing points at; a cycle is cut where the walk
//! first meets it) and drawn as SVG, every label escaped by the template.

use crate::config::Config;
use maud::{html, Markup};
use std::collections::{BTreeMap, VecDeque};

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Exchange,
    Queue,
    Dlq,
    Stage,
}

/// A node: its kind, name, and the lines of live text under the name.
#[derive(Clone, Debug)]
pub(super) struct Node {
    pub(super) kind: Kind,
    pub(super) name: String,
    /// Extra CSS classes (`paused`, `above`).
    pub(super) class: String,
    pub(super) lines: Vec<String>,
    /// Where a click leads.
    pub(super) href: Option<String>,
}

/// An edge with its label (a binding or routing key); `dead`: dead letters.
#[derive(Clone, Debug)]
pub(super) struct Edge {
    from: usize,
    to: usize,
    label: String,
    dead: bool,
}

/// The topology of a config.
pub(super) struct Graph {
    pub(super) nodes: Vec<Node>,
    edges: Vec<Edge>,
}

impl Graph {
    /// The nodes and edges of `cfg`, without live text.
    pub(super) fn of(cfg: &Config) -> Graph {
        let mut g = Graph {
            nodes: Vec::new(),
            edges: Vec::new(),
        };
        let mut index: BTreeMap<(u8, String), usize> = BTreeMap::new();
        let mut node = |g: &mut Graph, kind: Kind, name: &str| -> usize {
            let k = (kind as u8, name.to_owned());
            *index.entry(k).or_insert_with(|| {
                g.nodes.push(Node {
                    kind,
                    name: name.to_owned(),
                    class: String::new(),
                    lines: Vec::new(),
                    href: None,
                });
                g.nodes.len() - 1
            })
        };
        for e in &cfg.exchanges {
            node(&mut g, Kind::Exchange, &e.name);
        }
        for q in &cfg.queues {
            let qn = node(&mut g, Kind::Queue, &q.name);
            for b in &q.bindings {
                let x = node(&mut g, Kind::Exchange, &b.exchange);
                g.edges.push(Edge {
                    from: x,
                    to: qn,
                    label: b.routing_key.clone(),
                    dead: false,
                });
            }
            if let Some(dlq) = q.dead_letter_queue() {
                let d = node(&mut g, Kind::Dlq, &dlq);
                g.edges.push(Edge {
                    from: qn,
                    to: d,
                    label: "dead letters".into(),
                    dead: true,
                });
            }
        }
        for s in &cfg.stages {
            let sn = node(&mut g, Kind::Stage, &s.name);
            let q = node(&mut g, Kind::Queue, &s.queue);
            g.edges.push(Edge {
                from: q,
                to: sn,
                label: String::new(),
                dead: false,
            });
            if let Some(o) = &s.output {
                let x = node(&mut g, Kind::Exchange, &o.exchange);
                g.edges.push(Edge {
                    from: sn,
                    to: x,
                    label: o.routing_key.clone(),
                    dead: false,
                });
            }
        }
        g
    }

    /// Each node's column: breadth-first distance from the sources.
    fn columns(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let mut indegree = vec![0usize; n];
        for e in &self.edges {
            indegree[e.to] += 1;
        }
        let mut col = vec![usize::MAX; n];
        let mut queue: VecDeque<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
        for &i in &queue {
            col[i] = 0;
        }
        loop {
            while let Some(i) = queue.pop_front() {
                for e in self.edges.iter().filter(|e| e.from == i) {
                    if col[e.to] == usize::MAX {
                        col[e.to] = col[i] + 1;
                        queue.push_back(e.to);
                    }
                }
            }
            // A cycle nothing outside points into: start it at column 0.
            match (0..n).find(|&i| col[i] == usize::MAX) {
                Some(i) => {
                    col[i] = 0;
                    queue.push_back(i);
                }
                None => break,
            }
        }
        col
    }

    /// The SVG drawing.
    pub(super) fn svg(&self) -> Markup {
        const W: usize = 190;
        const GAP_X: usize = 70;
        const H: usize = 64;
        const GAP_Y: usize = 22;
        let cols = self.columns();
        let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
        let mut pos = vec![(0usize, 0usize); self.nodes.len()];
        for (i, &c) in cols.iter().enumerate() {
            let r = rows.entry(c).or_default();
            pos[i] = (10 + c * (W + GAP_X), 10 + *r * (H + GAP_Y));
            *r += 1;
        }
        let width = 20 + (cols.iter().max().copied().unwrap_or(0) + 1) * (W + GAP_X);
        let height = 20 + rows.values().max().copied().unwrap_or(1) * (H + GAP_Y);
        html! {
            svg xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
                viewBox=(format!("0 0 {width} {height}")) role="img" aria-label="pipeline topology" {
                defs {
                    marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                        path d="M 0 0 L 10 5 L 0 10 z" fill="#8a93a6" {}
                    }
                }
                @for e in &self.edges {
                    @let (fx, fy) = pos[e.from];
                    @let (tx, ty) = pos[e.to];
                    @let (x1, y1, x2, y2) = (fx + W, fy + H / 2, tx, ty + H / 2);
                    @let back = x2 <= x1;
                    @let d = if back {
                        format!("M {x1} {y1} C {} {y1}, {} {y2}, {x2} {y2}", x1 + 40, x2.saturating_sub(40))
                    } else {
                        format!("M {x1} {y1} C {} {y1}, {} {y2}, {x2} {y2}", (x1 + x2) / 2, (x1 + x2) / 2)
                    };
                    path class=(if e.dead { "edge dead" } else { "edge" }) d=(d) marker-end="url(#arrow)" {}
                    @if !e.label.is_empty() {
                        text class="label" x=((x1 + x2) / 2) y=((y1 + y2) / 2 - 4) text-anchor="middle" { (clip(&e.label, 24)) }
                    }
                }
                @for (i, n) in self.nodes.iter().enumerate() {
                    @let (x, y) = pos[i];
                    @let kind = match n.kind { Kind::Exchange => "exchange", Kind::Queue => "queue", Kind::Dlq => "dlq", Kind::Stage => "stage" };
                    g class="node" data-kind=(kind) data-name=(n.name) {
                        @let body = html! {
                            rect class=(format!("{kind} {}", n.class)) x=(x) y=(y) width=(W) height=(H) rx="5" {}
                            text x=(x + 8) y=(y + 16) { (clip(&n.name, 26)) }
                            @for (j, l) in n.lines.iter().take(3).enumerate() {
                                text class="sub" x=(x + 8) y=(y + 31 + j * 13) { (clip(l, 30)) }
                            }
                        };
                        @match &n.href {
                            Some(h) => { a href=(h) { (body) } }
                            None => { (body) }
                        }
                    }
                }
            }
        }
    }
}

/// At most `max` characters of `s` (… when cut).
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_laid_out_left_to_right_and_labels_are_escaped() {
        let cfg = flowgate_testkit_free_chain();
        let g = Graph::of(&cfg);
        let cols = g.columns();
        let col = |kind: Kind, name: &str| {
            cols[g
                .nodes
                .iter()
                .position(|n| n.kind == kind && n.name == name)
                .unwrap()]
        };
        assert_eq!(col(Kind::Exchange, "ex"), 0);
        assert_eq!(col(Kind::Queue, "q1"), 1);
        assert_eq!(col(Kind::Stage, "s1"), 2);
        assert_eq!(col(Kind::Dlq, "q1.dlq"), 2);
        let svg = g.svg().into_string();
        assert!(svg.contains("&lt;b&gt;"), "a hostile key is escaped: {svg}");
        assert!(!svg.contains("<b>"));
    }

    fn flowgate_testkit_free_chain() -> Config {
        Config::from_toml(
            r#"
            [[exchanges]]
            name = "ex"
            [[queues]]
            name = "q1"
            kind = "classic"
            bindings = [{ exchange = "ex", routing_key = "<b>" }]
            [[queues]]
            name = "q2"
            bindings = [{ exchange = "ex", routing_key = "hop" }]
            [[stages]]
            name = "s1"
            queue = "q1"
            output = { exchange = "ex", routing_key = "hop" }
            "#,
        )
        .unwrap()
    }
}
