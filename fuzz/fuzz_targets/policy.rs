//! Fuzzes `session::policy::Rules::screen`: arbitrary commands (arguments split at NUL
//! bytes; any bytes, any case, any count) screened by a policy with proxy authentication,
//! denied and renamed commands, inside and outside MULTI, authenticated or not.
//!
//! Checks, on every input: nothing panics; what `Rules::concerns` (the session's cheap
//! test on the name alone) passes over, the screen lets through; an answer is one RESP error or status line (it
//! starts with `-` or `+`, ends with one `\r\n`, and holds no other line break), as the
//! session writes it to the client as is; a rewrite keeps a command name and never
//! grows the argument count; a command is never let through unauthenticated unless it is
//! QUIT.

#![no_main]

use geoproxy::config::Config;
use geoproxy::session::policy::{Rules, Screen, Standing};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
[proxy]
listen = "127.0.0.1:0"
mode = "colocated"
auth = "proxy"
users = [{ name = "default", password = "pw" }, { name = "app", password = "a\r\nb" }]
[admin]
listen = "127.0.0.1:0"
[[members]]
id = "a"
address = "127.0.0.1:7001"
[commands]
deny = ["FLUSHALL", "keys"]
rename = { CONFIG = "CFG", DEBUG = "" }
"#;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    static RULES: std::sync::OnceLock<Rules> = std::sync::OnceLock::new();
    let rules = RULES.get_or_init(|| Rules::new(&Config::from_toml(CONFIG).expect("valid")));
    let args: Vec<Vec<u8>> = rest.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
    let mut standing = Standing {
        authenticated: flags & 1 == 1,
        in_multi: flags & 2 == 2,
    };
    let before = standing;
    let concerned = rules.concerns(&args[0], &standing);
    let (screen, _) = rules.screen(&args, &mut standing);
    // The session screens only what `concerns` names: everything else must pass.
    assert!(concerned || screen == Screen::Pass, "{args:?}");
    match &screen {
        Screen::Answer(reply) => {
            assert!(matches!(reply.first(), Some(b'-' | b'+')), "{reply:?}");
            assert!(reply.ends_with(b"\r\n"), "{reply:?}");
            let body = &reply[..reply.len() - 2];
            assert!(!body.contains(&b'\r') && !body.contains(&b'\n'), "{reply:?}");
        }
        Screen::Rewrite(new) => {
            assert!(!new.is_empty() && new.len() <= args.len());
            assert!(!new[0].is_empty());
        }
        Screen::Pass => {
            let name = args[0].to_ascii_lowercase();
            if !before.authenticated {
                assert!(name == b"quit" || name == b"hello" && standing.authenticated);
            }
        }
        Screen::Reset => {}
    }
});
