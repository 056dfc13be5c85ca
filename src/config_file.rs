//! `--config FILE` for `meshid ca serve` and `meshid sidecar`: a YAML map whose keys are the
//! command's long flags (`cert-dir: /var/run/meshid`, `cert_dir` too), as SPIRE and Istio
//! users keep their settings in files.
//!
//! Precedence is flag > environment variable > file > default: each key of the file becomes
//! its flag on the command line unless the flag is given there already or its environment
//! variable is set. Then clap parses the whole, so a value from the file is checked exactly as
//! the same flag would be. Unknown keys, values of the wrong shape and unreadable files are
//! refused with the file, the line and what is expected.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, Command};
use serde_saphyr::Spanned;

/// The commands that take `--config`.
const WITH_CONFIG: &[&[&str]] = &[&["sidecar"], &["ca", "serve"]];

/// `argv` with the settings of its `--config` file (or `MESHID_CONFIG`) added as flags.
pub fn expand(cli: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some((path, at)) = subcommand(cli, &argv) else {
        return Ok(argv);
    };
    let Some(command) = path.iter().try_fold(cli, |c, name| c.find_subcommand(name)) else {
        return Ok(argv);
    };
    let file = match config_flag(&argv[at..]) {
        Some(file) => file,
        None => match std::env::var_os("MESHID_CONFIG") {
            Some(f) if !f.is_empty() => PathBuf::from(f),
            _ => return Ok(argv),
        },
    };
    let name = format!("--config {}", file.display());
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{name}: {e}"))?;
    // Globals (`--log`) may come before the subcommand: every word counts as given.
    let added = flags_from(&text, cli, command, &argv[1..], &path.join(" "))
        .map_err(|e| format!("{name}: {e}"))?;
    let mut out = argv;
    out.extend(added);
    Ok(out)
}

/// The subcommand path (`["ca", "serve"]`) if it is one that takes `--config`, and the index in
/// `argv` after it.
fn subcommand(cli: &Command, argv: &[OsString]) -> Option<(Vec<String>, usize)> {
    let mut words = Vec::new();
    let mut i = 1;
    let mut command = cli;
    while i < argv.len() {
        let arg = argv[i].to_str()?;
        i += 1;
        if let Some(long) = arg.strip_prefix("--") {
            // A global flag before the subcommand (`meshid ca --log debug serve`); its value
            // is the next word unless `=`. Globals are the root's until clap builds the tree.
            let takes_value = !long.contains('=')
                && command
                    .get_arguments()
                    .chain(cli.get_arguments().filter(|a| a.is_global_set()))
                    .find(|a| a.get_long() == Some(long))
                    .is_some_and(|a| a.get_action().takes_values());
            i += usize::from(takes_value);
            continue;
        }
        if arg.starts_with('-') {
            return None;
        }
        let sub = command.find_subcommand(arg)?;
        words.push(arg.to_owned());
        command = sub;
        if WITH_CONFIG.iter().any(|w| *w == words.as_slice()) {
            return Some((words, i));
        }
        if !command.has_subcommands() {
            return None;
        }
    }
    None
}

/// The value of `--config FILE` or `--config=FILE` among the words after the subcommand.
fn config_flag(given: &[OsString]) -> Option<PathBuf> {
    let mut words = given.iter();
    while let Some(w) = words.next() {
        if w == "--config" {
            return words.next().map(PathBuf::from);
        }
        if let Some(v) = w.to_str().and_then(|w| w.strip_prefix("--config=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

fn flags_from(
    text: &str,
    cli: &Command,
    command: &Command,
    given: &[OsString],
    command_name: &str,
) -> Result<Vec<OsString>, String> {
    let doc: BTreeMap<String, Spanned<serde_json::Value>> = if text.trim().is_empty() {
        BTreeMap::new()
    } else {
        serde_saphyr::from_str(text).map_err(|e| {
            let line = e.location().map(|l| format!("line {}: ", l.line()));
            format!(
                "{}{} (a config file is a map of flag names to values)",
                line.unwrap_or_default(),
                e.without_snippet()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("does not parse")
            )
        })?
    };
    // The command's flags and the global ones (`log`, `log-format`); never `config` itself.
    let args: Vec<&clap::Arg> = command
        .get_arguments()
        .chain(cli.get_arguments().filter(|a| a.is_global_set()))
        .filter(|a| a.get_long().is_some_and(|l| l != "config" && l != "help"))
        .collect();
    // Given on the command line, or by a (non-empty) environment variable.
    let is_given = |arg: &clap::Arg| {
        let flag = arg.get_long().map(|l| format!("--{l}"));
        let on_command_line = given.iter().any(|w| {
            w.to_str().is_some_and(|w| {
                flag.as_deref().is_some_and(|flag| {
                    w == flag
                        || w.strip_prefix(flag)
                            .is_some_and(|rest| rest.starts_with('='))
                }) || arg.get_short().is_some_and(|c| {
                    w.len() >= 2 && w.starts_with(&format!("-{c}")) && !w.starts_with("--")
                })
            })
        });
        on_command_line
            || arg
                .get_env()
                .and_then(std::env::var_os)
                .is_some_and(|v| !v.is_empty())
    };
    let given_args: Vec<&clap::Arg> = args.iter().copied().filter(|a| is_given(a)).collect();
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut out = Vec::new();
    // In the file's order, so the first mistake reported is the first one in the file.
    let mut doc: Vec<(String, Spanned<serde_json::Value>)> = doc.into_iter().collect();
    doc.sort_by_key(|(_, v)| v.referenced.line());
    for (key, value) in doc {
        let line = value.referenced.line();
        let long = key.replace('_', "-");
        if let Some(first) = seen.insert(long.clone(), line) {
            return Err(format!(
                "line {line}: {key} is set twice (also on line {first})"
            ));
        }
        let Some(arg) = args.iter().find(|a| a.get_long() == Some(long.as_str())) else {
            let mut known: Vec<&str> = args.iter().filter_map(|a| a.get_long()).collect();
            known.sort_unstable();
            return Err(format!(
                "line {line}: unknown key {key:?}: the keys are the flags of `meshid {command_name}`: {}",
                known.join(", ")
            ));
        };
        let flag = format!("--{long}");
        // Given already, or in conflict with what is (the file's join-token and a
        // --k8s-token-file on the command line): the command line decides.
        let conflicts = |a: &clap::Arg, b: &clap::Arg| {
            command
                .get_arg_conflicts_with(a)
                .iter()
                .any(|c| c.get_id() == b.get_id())
        };
        if given_args
            .iter()
            .any(|g| g.get_id() == arg.get_id() || conflicts(g, arg) || conflicts(arg, g))
        {
            continue;
        }
        let scalar = |v: &serde_json::Value| -> Result<String, String> {
            match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                serde_json::Value::Bool(b) => Ok(b.to_string()),
                _ => Err(format!(
                    "line {line}: {key}: a value is a string, a number or true/false"
                )),
            }
        };
        match (arg.get_action(), &value.value) {
            (ArgAction::SetTrue, serde_json::Value::Bool(true)) => out.push(flag.into()),
            (ArgAction::SetTrue, serde_json::Value::Bool(false)) => {}
            (ArgAction::SetTrue, _) => {
                return Err(format!("line {line}: {key} is true or false"));
            }
            // `--flag=value`, one word: a value that starts with `-` stays a value.
            (ArgAction::Append, serde_json::Value::Array(items)) => {
                for item in items {
                    out.push(format!("{flag}={}", scalar(item)?).into());
                }
            }
            (_, serde_json::Value::Array(_)) => {
                return Err(format!("line {line}: {key} takes one value, not a list"));
            }
            (action, v) if action.takes_values() => {
                out.push(format!("{flag}={}", scalar(v)?).into());
            }
            _ => return Err(format!("line {line}: {key} cannot be set from a file")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cli() -> Command {
        Command::new("meshid")
            .arg(
                Arg::new("log")
                    .long("log")
                    .global(true)
                    .default_value("info"),
            )
            .subcommand(
                Command::new("sidecar")
                    .arg(Arg::new("config").long("config"))
                    .arg(
                        Arg::new("cert_dir")
                            .long("cert-dir")
                            .env("MESHID_T_CERT_DIR"),
                    )
                    .arg(Arg::new("app").long("app"))
                    .arg(Arg::new("route").long("route").action(ArgAction::Append))
                    .arg(
                        Arg::new("allowed")
                            .long("access-log-allowed")
                            .action(ArgAction::SetTrue),
                    )
                    .arg(
                        Arg::new("join_token")
                            .long("join-token")
                            .conflicts_with("k8s_token_file"),
                    )
                    .arg(Arg::new("k8s_token_file").long("k8s-token-file")),
            )
            .subcommand(
                Command::new("ca").subcommand(
                    Command::new("serve")
                        .arg(Arg::new("config").long("config"))
                        .arg(Arg::new("data_dir").long("data-dir")),
                ),
            )
            .subcommand(Command::new("inspect"))
    }

    fn expanded(args: &[&str], file: &str) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        argv.push("--config".into());
        argv.push(path.clone().into());
        let out = expand(&cli(), argv)?;
        Ok(out
            .into_iter()
            .skip(args.len() + 2)
            .map(|s| s.into_string().unwrap())
            .collect())
    }

    #[test]
    fn keys_become_flags_unless_given() {
        let file = "cert_dir: /var/run/meshid\napp: 127.0.0.1:8080\nroute: [a=1:1, b=2:2]\naccess-log-allowed: true\nlog: debug\n";
        assert_eq!(
            expanded(&["meshid", "sidecar"], file).unwrap(),
            [
                "--cert-dir=/var/run/meshid",
                "--app=127.0.0.1:8080",
                "--route=a=1:1",
                "--route=b=2:2",
                "--access-log-allowed",
                "--log=debug"
            ]
        );
        // The command line wins, in either spelling.
        let got = expanded(
            &["meshid", "--log", "warn", "sidecar", "--app=1.2.3.4:5"],
            file,
        )
        .unwrap();
        assert!(!got.iter().any(|a| a.starts_with("--app=")), "{got:?}");
        assert!(
            !got.iter().any(|a| a.starts_with("--log=")),
            "a global before the subcommand counts as given: {got:?}"
        );
    }

    #[test]
    fn mistakes_name_the_line_and_what_is_expected() {
        let e = expanded(&["meshid", "sidecar"], "app: 127.0.0.1:1\ncert-dri: /x\n").unwrap_err();
        assert!(e.contains("line 2: unknown key \"cert-dri\""), "{e}");
        assert!(e.contains("cert-dir"), "the known keys are listed: {e}");
        let e = expanded(&["meshid", "sidecar"], "app: [1, 2]\n").unwrap_err();
        assert!(e.contains("line 1: app takes one value, not a list"), "{e}");
        let e = expanded(&["meshid", "sidecar"], "access-log-allowed: yes please\n").unwrap_err();
        assert!(e.contains("is true or false"), "{e}");
        let e = expanded(&["meshid", "sidecar"], "app: 1\ncert_dir: a\ncert-dir: b\n").unwrap_err();
        assert!(e.contains("set twice"), "{e}");
        let e = expanded(&["meshid", "sidecar"], "- a\n- b\n").unwrap_err();
        assert!(e.contains("a map of flag names"), "{e}");
        let e = expand(
            &cli(),
            ["meshid", "sidecar", "--config", "/nonexistent/c.yaml"]
                .iter()
                .map(OsString::from)
                .collect(),
        )
        .unwrap_err();
        assert!(e.starts_with("--config /nonexistent/c.yaml: "), "{e}");
    }

    #[test]
    fn the_command_line_decides_conflicts_and_values_stay_values() {
        // The file's join token gives way to a --k8s-token-file on the command line.
        let got = expanded(
            &["meshid", "sidecar", "--k8s-token-file", "/var/run/t"],
            "join-token: mjt.x\napp: 1.2.3.4:5\n",
        )
        .unwrap();
        assert_eq!(got, ["--app=1.2.3.4:5"]);
        // A value that looks like a flag is one word with its flag.
        let got = expanded(&["meshid", "sidecar"], "app: --access-log-allowed\n").unwrap();
        assert_eq!(got, ["--app=--access-log-allowed"]);
        // A global before a nested subcommand does not hide it.
        let got = expanded(
            &["meshid", "ca", "--log", "debug", "serve"],
            "data-dir: /d\n",
        )
        .unwrap();
        assert_eq!(got, ["--data-dir=/d"]);
    }

    #[test]
    fn other_commands_are_left_alone() {
        let argv: Vec<OsString> = ["meshid", "inspect", "--config", "x"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(expand(&cli(), argv.clone()).unwrap(), argv);
    }
}
