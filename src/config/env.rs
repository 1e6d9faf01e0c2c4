//! `FLOWGATE__*` environment overrides, including single array elements.
//!
//! The `config` crate maps `FLOWGATE__STAGES__0__PREFETCH` to the key
//! `stages.0.prefetch`, which turns the file's `stages` array into a map
//! with a key `"0"` and makes the whole file invalid. So before the
//! environment source is added, every variable whose path goes through an
//! array the file declares is taken out and applied as an override of that
//! one element (`stages[0].prefetch`); the others are left to the `config`
//! crate's environment source as before.
//!
//! An index must address an element the file declares: the environment
//! tunes a stage, it does not invent one.

use super::ConfigError;

/// Prefix and separator of every override variable.
const PREFIX: &str = "FLOWGATE";
const SEPARATOR: &str = "__";

/// The file's settings with the environment's overrides on top.
pub(super) fn layered<S>(file: S) -> Result<config::Config, ConfigError>
where
    S: config::Source + Send + Sync + 'static,
{
    let mut vars = Vec::new();
    for (k, v) in std::env::vars_os() {
        // Like the `config` crate: keys that are not Unicode are not ours.
        let Ok(k) = k.into_string() else { continue };
        if !is_ours(&k) {
            continue;
        }
        match v.into_string() {
            Ok(v) => vars.push((k, v)),
            Err(_) => {
                return Err(ConfigError::new(
                    k,
                    "environment variable is not valid Unicode",
                ))
            }
        }
    }
    layered_with(file, vars)
}

fn is_ours(var: &str) -> bool {
    let p = format!("{PREFIX}{SEPARATOR}");
    var.len() > p.len()
        && var
            .get(..p.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(&p))
}

/// [`layered`] with the variables given (tests pass their own).
pub(super) fn layered_with<S>(
    file: S,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<config::Config, ConfigError>
where
    S: config::Source + Send + Sync + 'static,
{
    let file = config::Config::builder()
        .add_source(file)
        .build()
        .map_err(super::source_error)?;
    let mut plain = config::Map::new();
    let mut builder = config::Config::builder().add_source(file.clone());
    for (var, value) in vars {
        if !is_ours(&var) {
            continue;
        }
        match element_path(&file, &var)? {
            Some(path) => {
                builder = builder
                    .set_override(&path, parse(value))
                    .map_err(|e| ConfigError::new(path.clone(), e.to_string()))?;
            }
            None => {
                plain.insert(var, value);
            }
        }
    }
    builder
        .add_source(
            config::Environment::with_prefix(PREFIX)
                .prefix_separator(SEPARATOR)
                .separator(SEPARATOR)
                .try_parsing(true)
                .source(Some(plain)),
        )
        .build()
        .map_err(super::source_error)
}

/// `stages[0].prefetch` for `FLOWGATE__STAGES__0__PREFETCH` when `stages`
/// is an array in `file`; `None` when no segment indexes an array.
fn element_path(file: &config::Config, var: &str) -> Result<Option<String>, ConfigError> {
    let rest = &var[PREFIX.len() + SEPARATOR.len()..];
    let mut path = String::new();
    let mut indexed = false;
    for seg in rest.split(SEPARATOR) {
        let seg = seg.to_lowercase();
        let index = seg.parse::<usize>().ok();
        let array = if path.is_empty() {
            None
        } else {
            file.get_array(&path).ok()
        };
        match (index, array) {
            (Some(i), Some(a)) => {
                if i >= a.len() {
                    return Err(ConfigError::new(
                        format!("{path}[{i}]"),
                        format!(
                            "{var} overrides element {i}, but the file declares {} (indices from 0)",
                            a.len()
                        ),
                    ));
                }
                path.push_str(&format!("[{i}]"));
                indexed = true;
            }
            _ => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&seg);
            }
        }
    }
    Ok(indexed.then_some(path))
}

/// Like the `config` crate's `try_parsing`: a bool, an integer, a float, or
/// the text.
fn parse(value: String) -> config::Value {
    if let Ok(b) = value.to_lowercase().parse::<bool>() {
        b.into()
    } else if let Ok(i) = value.parse::<i64>() {
        i.into()
    } else if let Ok(f) = value.parse::<f64>() {
        f.into()
    } else {
        value.into()
    }
}

#[cfg(test)]
mod tests {
    use super::layered_with;
    use crate::config::Config;

    const BASE: &str = r#"
[[exchanges]]
name = "shop"
[[queues]]
name = "a"
bindings = [{ exchange = "shop", routing_key = "a" }]
[[queues]]
name = "b"
bindings = [{ exchange = "shop", routing_key = "b" }, { exchange = "shop", routing_key = "c" }]
[[stages]]
name = "one"
queue = "a"
handler = "sink"
[[stages]]
name = "two"
queue = "b"
handler = "sink"
prefetch = 3
"#;

    fn load(vars: &[(&str, &str)]) -> Result<Config, crate::config::ConfigError> {
        let file = config::File::from_str(BASE, config::FileFormat::Toml);
        let vars = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        let built = layered_with(file, vars)?;
        built.try_deserialize().map_err(crate::config::source_error)
    }

    #[test]
    fn one_array_element_is_overridden_and_the_rest_kept() {
        let cfg = load(&[
            ("FLOWGATE__STAGES__0__PREFETCH", "7"),
            ("FLOWGATE__STAGES__1__HANDLER", "forward"),
            ("FLOWGATE__QUEUES__1__BINDINGS__1__ROUTING_KEY", "d.#"),
        ])
        .unwrap();
        assert_eq!(cfg.stages.len(), 2);
        assert_eq!(cfg.stages[0].prefetch, 7);
        assert_eq!(cfg.stages[0].name, "one");
        assert_eq!(cfg.stages[1].prefetch, 3);
        assert_eq!(cfg.stages[1].handler, "forward");
        assert_eq!(cfg.queues[1].bindings[0].routing_key, "b");
        assert_eq!(cfg.queues[1].bindings[1].routing_key, "d.#");
    }

    #[test]
    fn plain_keys_still_come_from_the_environment() {
        let cfg = load(&[
            ("FLOWGATE__PUBLISHER__MAX_UNCONFIRMED", "9"),
            ("FLOWGATE__STAGES__1__PREFETCH", "11"),
        ])
        .unwrap();
        assert_eq!(cfg.publisher.max_unconfirmed, 9);
        assert_eq!(cfg.stages[1].prefetch, 11);
    }

    #[test]
    fn the_instance_index_comes_from_the_environment() {
        // A StatefulSet passes its pod ordinal; the file holds the count.
        let cfg = load(&[
            ("FLOWGATE__PARTITIONING__INSTANCE_INDEX", "1"),
            ("FLOWGATE__PARTITIONING__INSTANCE_COUNT", "3"),
        ])
        .unwrap();
        assert_eq!(cfg.partitioning.instance_index, Some(1));
        assert_eq!(cfg.partitioning.instance_count, Some(3));
    }

    #[test]
    fn an_index_past_the_file_names_the_element() {
        let e = load(&[("FLOWGATE__STAGES__2__PREFETCH", "7")]).unwrap_err();
        assert_eq!(e.key, "stages[2]");
        assert!(e.reason.contains("FLOWGATE__STAGES__2__PREFETCH"), "{e}");
    }

    #[test]
    fn a_bad_element_value_names_its_key() {
        let e = load(&[("FLOWGATE__STAGES__0__PREFETCH", "lots")]).unwrap_err();
        assert!(e.to_string().contains("stages[0].prefetch"), "{e}");
    }
}
