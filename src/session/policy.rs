//! What the proxy decides about a command before any member sees it: the command policy
//! (`[commands]`: denied and renamed commands) and, with `proxy.auth = "proxy"`, the
//! client's authentication against `[[proxy.users]]`. Pure: a command in, a [`Screen`] out.
//!
//! Answers are Redis's own bytes wherever Redis has an answer (`-NOAUTH`, `-WRONGPASS`, the
//! unknown-command error of a renamed command); a denied command gets geoproxy's
//! `-ERR geoproxy: ...` text. Inside MULTI a refused command must also make EXEC abort, as
//! a command Redis refuses at queue time does: it goes to the member under a name no
//! member knows (`<name>(denied-by-geoproxy)`, `<name>(renamed-by-geoproxy)`), whose error
//! ends the transaction the same way, and the client gets the same answer as outside MULTI
//! in place of that error ([`Screen::Rewrite`] with an answer).

use subtle::ConstantTimeEq;

use crate::config::{AuthMode, CommandPolicy, Config, User};
use crate::resp::request::encode_command;

/// What happens to one command.
#[derive(Debug, PartialEq, Eq)]
pub enum Screen {
    /// Goes to the member as sent.
    Pass,
    /// The proxy answers this itself.
    Answer(Vec<u8>),
    /// Goes to the member as `args` instead. With an `answer`, a command refused inside
    /// MULTI: `args` name a command the member refuses (so that EXEC aborts as in Redis),
    /// and the client gets `answer` in place of the member's error.
    Rewrite {
        args: Vec<Vec<u8>>,
        answer: Option<Vec<u8>>,
    },
    /// Proxy auth: `RESET` is answered `+RESET` and the session starts over, unauthenticated.
    Reset,
}

/// What a screen counts (metrics).
#[derive(Debug, PartialEq, Eq)]
pub enum Counted {
    /// Refused by the policy: the configured name, lower case.
    Denied(String),
    WrongPassword,
}

/// A session's standing with proxy authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Standing {
    pub authenticated: bool,
    /// The client sent MULTI (a refused command must abort EXEC).
    pub in_multi: bool,
}

pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
pub const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const NOAUTH_HELLO: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";

/// The rules a session screens its commands with.
#[derive(Debug, Default)]
pub struct Rules {
    pub commands: CommandPolicy,
    /// `Some` with `proxy.auth = "proxy"`.
    pub users: Option<Vec<User>>,
}

/// Command names longer than this are never in a policy (Redis's longest is 20 bytes).
const MAX_NAME: usize = 64;

impl Rules {
    /// The policy and proxy users of a validated configuration.
    pub fn new(config: &Config) -> Rules {
        Rules {
            commands: config.commands.clone(),
            users: (config.proxy.auth == AuthMode::Proxy).then(|| config.proxy.users.clone()),
        }
    }

    /// Nothing to screen: the hot path skips the policy with one branch.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.users.is_none()
    }

    /// Does the screen have anything to say about a command of this name? Decided from the
    /// name alone, without allocating: an ordinary command of an authenticated client goes
    /// to the member without its arguments ever being copied.
    pub fn concerns(&self, name: &[u8], standing: &Standing) -> bool {
        if self.users.is_some() && !standing.authenticated {
            return true;
        }
        if name.len() > MAX_NAME {
            return false;
        }
        let mut buf = [0u8; MAX_NAME];
        let lower = &mut buf[..name.len()];
        lower.copy_from_slice(name);
        lower.make_ascii_lowercase();
        let lower = &*lower;
        let c = &self.commands;
        (self.users.is_some() && matches!(lower, b"auth" | b"hello" | b"reset"))
            || c.deny.contains(lower)
            || c.hidden.contains(lower)
            || c.renamed.contains_key(lower)
    }

    /// Screens one command (`args[0]` is its name as the client sent it). `authenticated`
    /// becomes true when the command authenticates the client.
    pub fn screen(&self, args: &[Vec<u8>], standing: &mut Standing) -> (Screen, Option<Counted>) {
        let Some(name) = args.first() else {
            return (Screen::Pass, None);
        };
        let lower = name.to_ascii_lowercase();
        if let Some(users) = &self.users {
            let screen = match lower.as_slice() {
                b"auth" => Some(Screen::Answer(auth(users, args, standing))),
                b"hello" => Some(hello(users, args, standing)),
                b"quit" => Some(Screen::Pass),
                b"reset" => Some(Screen::Reset),
                _ if !standing.authenticated => Some(Screen::Answer(NOAUTH.to_vec())),
                _ => None,
            };
            if let Some(screen) = screen {
                let failed = matches!(&screen, Screen::Answer(r) if r == WRONGPASS);
                return (screen, failed.then_some(Counted::WrongPassword));
            }
        }
        let c = &self.commands;
        let counted = || {
            Some(Counted::Denied(
                String::from_utf8_lossy(&lower).into_owned(),
            ))
        };
        if c.deny.contains(&lower) {
            let mut unknown = lower.clone();
            unknown.extend_from_slice(b"(denied-by-geoproxy)");
            return (refuse(args, standing, denied(&lower), unknown), counted());
        }
        if c.hidden.contains(&lower) {
            // Inside MULTI the member must refuse it: a name with a '(' (no command has
            // one). Never `name` + NUL + a suffix: Redis finds a command with `strcasecmp`,
            // which stops at the NUL, among the names in the same hash bucket, and the hash
            // covers the whole name with a seed drawn at the member's start: in about one
            // member process in 256 the NUL name shares the real command's bucket and RUNS
            // it.
            let mut unknown = name.clone();
            unknown.extend_from_slice(b"(renamed-by-geoproxy)");
            return (
                refuse(args, standing, unknown_command(args), unknown),
                counted(),
            );
        }
        if let Some(original) = c.renamed.get(&lower) {
            let mut rewritten = args.to_vec();
            rewritten[0] = original.clone();
            return (
                Screen::Rewrite {
                    args: rewritten,
                    answer: None,
                },
                None,
            );
        }
        (Screen::Pass, None)
    }
}

/// `AUTH [user] password`, checked here.
fn auth(users: &[User], args: &[Vec<u8>], standing: &mut Standing) -> Vec<u8> {
    let (user, password) = match args {
        [_, password] => (&b"default"[..], password),
        [_, user, password] => (&user[..], password),
        [_] => return b"-ERR wrong number of arguments for 'auth' command\r\n".to_vec(),
        _ => return b"-ERR syntax error\r\n".to_vec(),
    };
    if check(users, user, password) {
        standing.authenticated = true;
        b"+OK\r\n".to_vec()
    } else {
        // A failed AUTH leaves an authenticated client as it was, as in Redis.
        WRONGPASS.to_vec()
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`: the AUTH part is checked here and
/// taken out; the rest goes to the member, which answers with its own server info.
fn hello(users: &[User], args: &[Vec<u8>], standing: &mut Standing) -> Screen {
    let Some(at) = args
        .iter()
        .skip(2)
        .position(|a| a.eq_ignore_ascii_case(b"auth"))
        .map(|i| i + 2)
    else {
        return if standing.authenticated {
            Screen::Pass
        } else {
            Screen::Answer(NOAUTH_HELLO.to_vec())
        };
    };
    let (Some(user), Some(password)) = (args.get(at + 1), args.get(at + 2)) else {
        return Screen::Answer(b"-ERR Syntax error in HELLO option 'AUTH'\r\n".to_vec());
    };
    if !check(users, user, password) {
        return Screen::Answer(WRONGPASS.to_vec());
    }
    standing.authenticated = true;
    let mut rest = args.to_vec();
    rest.drain(at..at + 3);
    Screen::Rewrite {
        args: rest,
        answer: None,
    }
}

/// Does `user` exist with this `password`? Compared in constant time, every user tried.
fn check(users: &[User], user: &[u8], password: &[u8]) -> bool {
    users.iter().fold(false, |found, u| {
        let name = u.name.as_bytes().ct_eq(user);
        let pass = u.password.expose().as_bytes().ct_eq(password);
        found | bool::from(name & pass)
    })
}

/// A command the policy refuses: answered here, or, inside MULTI, sent as `unknown` (a
/// name no member knows) so that the member's transaction aborts at EXEC as Redis's would.
fn refuse(args: &[Vec<u8>], standing: &Standing, reply: Vec<u8>, unknown: Vec<u8>) -> Screen {
    if !standing.in_multi {
        return Screen::Answer(reply);
    }
    let mut rewritten = args.to_vec();
    rewritten[0] = unknown;
    Screen::Rewrite {
        args: rewritten,
        answer: Some(reply),
    }
}

fn denied(lower: &[u8]) -> Vec<u8> {
    let mut reply = b"-ERR geoproxy: command '".to_vec();
    reply.extend(sanitized(lower));
    reply.extend_from_slice(b"' is denied by this proxy's [commands] deny list\r\n");
    reply
}

/// Redis's reply to a command it does not know (what a command renamed away gets).
pub fn unknown_command(args: &[Vec<u8>]) -> Vec<u8> {
    let mut reply = b"-ERR unknown command '".to_vec();
    reply.extend(sanitized(&args[0][..args[0].len().min(128)]));
    reply.extend_from_slice(b"', with args beginning with: ");
    // As Redis: each argument quoted and followed by a space, until 128 bytes are listed.
    let mut listed = 0;
    for arg in &args[1..] {
        if listed >= 128 {
            break;
        }
        let take = arg.len().min(128 - listed);
        let mut quoted = Vec::with_capacity(take + 3);
        quoted.push(b'\'');
        quoted.extend_from_slice(&arg[..take]);
        quoted.extend_from_slice(b"' ");
        listed += quoted.len();
        reply.extend(sanitized(&quoted));
    }
    reply.extend_from_slice(b"\r\n");
    reply
}

/// Line breaks become spaces, as Redis does to error text.
fn sanitized(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    bytes
        .iter()
        .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
}

/// `AUTH [user] password` as one RESP command (the member's own credentials).
pub fn login(username: Option<&str>, password: &str) -> Vec<u8> {
    let mut args = vec![b"AUTH".to_vec()];
    args.extend(username.map(|u| u.as_bytes().to_vec()));
    args.push(password.as_bytes().to_vec());
    let mut bytes = Vec::new();
    encode_command(&args, &mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<Vec<u8>> {
        line.split(' ').map(|w| w.as_bytes().to_vec()).collect()
    }

    fn rules() -> Rules {
        let text = r#"
            [proxy]
            listen = "127.0.0.1:0"
            mode = "colocated"
            auth = "proxy"
            users = [{ name = "default", password = "pw" }, { name = "app", password = "apw" }]
            [admin]
            listen = "127.0.0.1:0"
            [[members]]
            id = "a"
            address = "127.0.0.1:7001"
            [commands]
            deny = ["FLUSHALL"]
            rename = { CONFIG = "CFG", DEBUG = "" }
        "#;
        Rules::new(&Config::from_toml(text).unwrap())
    }

    fn answer(text: &str) -> Screen {
        Screen::Answer(text.as_bytes().to_vec())
    }

    #[test]
    fn each_command_is_screened_as_redis_would_answer() {
        let r = rules();
        let no_auth = Standing::default();
        let authed = Standing {
            authenticated: true,
            in_multi: false,
        };
        let in_multi = Standing {
            authenticated: true,
            in_multi: true,
        };
        let wrongpass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
        let cases: &[(&str, Standing, Screen, bool)] = &[
            ("GET k", no_auth, answer("-NOAUTH Authentication required.\r\n"), false),
            ("QUIT", no_auth, Screen::Pass, false),
            ("RESET", no_auth, Screen::Reset, false),
            ("AUTH pw", no_auth, answer("+OK\r\n"), true),
            ("auth app apw", no_auth, answer("+OK\r\n"), true),
            ("AUTH app pw", no_auth, answer(wrongpass), false),
            ("AUTH nobody pw", no_auth, answer(wrongpass), false),
            ("AUTH wrong", authed, answer(wrongpass), true),
            ("AUTH a b c", no_auth, answer("-ERR syntax error\r\n"), false),
            ("HELLO 3", authed, Screen::Pass, true),
            (
                "HELLO 3 AUTH app apw SETNAME x",
                no_auth,
                Screen::Rewrite {
                    args: args("HELLO 3 SETNAME x"),
                    answer: None,
                },
                true,
            ),
            ("HELLO 3 AUTH app bad", no_auth, answer(wrongpass), false),
            (
                "HELLO 3 AUTH app",
                no_auth,
                answer("-ERR Syntax error in HELLO option 'AUTH'\r\n"),
                false,
            ),
            ("GET k", authed, Screen::Pass, true),
            (
                "cfg GET x",
                authed,
                Screen::Rewrite {
                    args: args("config GET x"),
                    answer: None,
                },
                true,
            ),
            (
                "CONFIG GET x",
                authed,
                answer("-ERR unknown command 'CONFIG', with args beginning with: 'GET' 'x' \r\n"),
                true,
            ),
            (
                "FlushAll",
                authed,
                answer("-ERR geoproxy: command 'flushall' is denied by this proxy's [commands] deny list\r\n"),
                true,
            ),
            (
                "FLUSHALL ASYNC",
                in_multi,
                Screen::Rewrite {
                    args: args("flushall(denied-by-geoproxy) ASYNC"),
                    answer: Some(b"-ERR geoproxy: command 'flushall' is denied by this proxy's [commands] deny list\r\n".to_vec()),
                },
                true,
            ),
            (
                "debug x",
                in_multi,
                Screen::Rewrite {
                    args: args("debug(renamed-by-geoproxy) x"),
                    answer: Some(b"-ERR unknown command 'debug', with args beginning with: 'x' \r\n".to_vec()),
                },
                true,
            ),
        ];
        for (line, standing, want, authenticated) in cases {
            let mut s = *standing;
            let args = args(line);
            // The session screens only what `concerns` names: it must name all of these.
            let concerned = r.concerns(&args[0], standing);
            let (got, _) = r.screen(&args, &mut s);
            assert_eq!(&got, want, "{line}");
            assert_eq!(s.authenticated, *authenticated, "{line}: authenticated");
            assert!(concerned || got == Screen::Pass, "{line}: not concerned");
        }
        // An ordinary command of an authenticated client is not looked at further.
        assert!(!r.concerns(b"GET", &authed));
        assert!(!r.concerns(&[b'x'; 100], &authed));
        assert!(r.concerns(b"GET", &no_auth));
    }

    #[test]
    fn the_unknown_command_error_lists_128_bytes_of_arguments_as_redis_does() {
        let long = "x".repeat(200);
        let reply = unknown_command(&args(&format!("NOPE a\r\nb {long} c")));
        let text = String::from_utf8(reply).unwrap();
        // `'a  b' ` takes 7 bytes; the long one is cut to the 121 left (`%.*s`), then the
        // list is full.
        let listed = text
            .strip_prefix("-ERR unknown command 'NOPE', with args beginning with: ")
            .unwrap()
            .strip_suffix("\r\n")
            .unwrap();
        assert!(listed.starts_with("'a  b' 'xxx"), "{listed}");
        assert_eq!(listed.len(), 7 + (128 - 7) + 3);
        assert!(!listed.contains("'c'"));
    }
}
