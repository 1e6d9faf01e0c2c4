//! A configuration's names made unique: a copy that can run beside others
//! on one broker (tests, demos, a host's test pipelines).

use super::Config;
use std::collections::HashSet;

impl Config {
    /// This configuration with every exchange and queue it names renamed
    /// `<prefix>.<name>` (bindings, stage queues, outputs and ingress
    /// routes follow; the default exchange and `amq.*` keep their names,
    /// and so do stage names, the metric labels), its connection named
    /// `prefix` and its Redis dedup keys under their own prefix.
    ///
    /// ```
    /// let host = flowgate::Config::from_toml(r#"
    ///     [[exchanges]]
    ///     name = "shop"
    ///     [[queues]]
    ///     name = "orders"
    ///     bindings = [{ exchange = "shop", routing_key = "order.created" }]
    /// "#)?;
    /// let c = host.uniquely_named("t-1");
    /// assert_eq!(c.queues[0].name, "t-1.orders");
    /// assert_eq!(c.queues[0].bindings[0].exchange, "t-1.shop");
    /// # Ok::<(), flowgate::ConfigError>(())
    /// ```
    pub fn uniquely_named(&self, prefix: &str) -> Config {
        let queues: HashSet<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
        let exchange = |name: &str| match name.is_empty() || name.starts_with("amq.") {
            true => name.to_owned(),
            false => format!("{prefix}.{name}"),
        };
        // Through the default exchange a routing key is a queue's name.
        let key = |exchange: &str, key: &str| match exchange.is_empty() && queues.contains(key) {
            true => format!("{prefix}.{key}"),
            false => key.to_owned(),
        };
        let mut c = self.clone();
        for e in &mut c.exchanges {
            e.name = exchange(&e.name);
        }
        for q in &mut c.queues {
            q.name = format!("{prefix}.{}", q.name);
            for b in &mut q.bindings {
                b.exchange = exchange(&b.exchange);
            }
        }
        for s in &mut c.stages {
            s.queue = format!("{prefix}.{}", s.queue);
            if let Some(o) = &mut s.output {
                o.routing_key = key(&o.exchange, &o.routing_key);
                o.exchange = exchange(&o.exchange);
            }
        }
        for r in &mut c.ingress.routes {
            r.exchange = exchange(&r.exchange);
        }
        c.amqp.connection_name = prefix.to_owned();
        c.dedup.prefix = format!("{}{prefix}:", self.dedup.prefix);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_and_every_reference_is_renamed() {
        let host = Config::from_toml(
            r#"
            [[exchanges]]
            name = "shop"
            [[queues]]
            name = "orders"
            bindings = [{ exchange = "shop", routing_key = "order.created" },
                        { exchange = "amq.topic", routing_key = "legacy" }]
            [[queues]]
            name = "audit"
            [[stages]]
            name = "enrich"
            queue = "orders"
            handler = "forward"
            output = { exchange = "", routing_key = "audit" }
            [[stages]]
            name = "audit"
            queue = "audit"
            handler = "forward"
            output = { exchange = "shop", routing_key = "order.audited" }
            [ingress]
            routes = [{ exchange = "shop" }]
            "#,
        )
        .expect("the host config parses");
        let c = host.uniquely_named("t-x");
        assert_eq!(c.exchanges[0].name, "t-x.shop");
        let names: Vec<_> = c.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["t-x.orders", "t-x.audit"]);
        let b = &c.queues[0].bindings;
        assert_eq!(
            (b[0].exchange.as_str(), b[1].exchange.as_str()),
            ("t-x.shop", "amq.topic")
        );
        assert_eq!(c.stages[0].queue, "t-x.orders");
        let o = c.stages[0].output.as_ref().unwrap();
        assert_eq!(
            (o.exchange.as_str(), o.routing_key.as_str()),
            ("", "t-x.audit")
        );
        let o = c.stages[1].output.as_ref().unwrap();
        assert_eq!(
            (o.exchange.as_str(), o.routing_key.as_str()),
            ("t-x.shop", "order.audited")
        );
        assert_eq!(c.ingress.routes[0].exchange, "t-x.shop");
        assert_eq!(c.amqp.connection_name, "t-x");
        assert_ne!(c.dedup.prefix, host.dedup.prefix);
        assert_eq!(
            c.stages[0].name, "enrich",
            "stage names (metric labels) stay"
        );
    }
}
