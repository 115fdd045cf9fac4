// wasmgate example filter in AssemblyScript, on Solo.io's Proxy-Wasm SDK (@solo-io/proxy-runtime).
// The same job as the Rust and C examples (filters/examples/README.md):
//   config (plain text, one directive per line):
//     add-header NAME VALUE     set request header NAME to VALUE before it goes upstream
//     require-header NAME       answer 403 to a request without header NAME
// Header names are matched as the host stores them: lowercase.
export * from "@solo-io/proxy-runtime/proxy"; // the proxy_on_* exports the host calls
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, GrpcStatusValues, HeaderPair, LogLevelValues, log,
} from "@solo-io/proxy-runtime";

class Rules {
  addName: Array<string> = [];
  addValue: Array<string> = [];
  require: Array<string> = [];
}

// "" when `line` is a directive we know; the reason otherwise.
function parseLine(rules: Rules, line: string): string {
  const sp = line.indexOf(" ");
  const directive = sp < 0 ? line : line.substring(0, sp);
  const rest = sp < 0 ? "" : line.substring(sp + 1).trim();
  if (directive == "add-header") {
    const sp2 = rest.indexOf(" ");
    if (sp2 <= 0) return "add-header needs NAME VALUE";
    rules.addName.push(rest.substring(0, sp2));
    rules.addValue.push(rest.substring(sp2 + 1).trim());
    return "";
  }
  if (directive == "require-header") {
    if (rest.length == 0 || rest.indexOf(" ") >= 0) return "require-header needs one NAME";
    rules.require.push(rest);
    return "";
  }
  return "unknown directive '" + directive + "' (add-header, require-header)";
}

class ExampleRoot extends RootContext {
  rules: Rules = new Rules();

  onConfigure(configuration_size: u32): bool {
    super.onConfigure(configuration_size); // reads the plugin configuration into getConfiguration()
    const rules = new Rules();
    const lines = this.getConfiguration().split("\n");
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i].trim();
      if (line.length == 0 || line.startsWith("#")) continue;
      const err = parseLine(rules, line);
      if (err.length > 0) {
        log(LogLevelValues.error, "example (assemblyscript): bad configuration, line " + (i + 1).toString() + ": " + err);
        return false; // the gateway refuses to load the filter
      }
    }
    this.rules = rules;
    return true;
  }

  createContext(context_id: u32): Context {
    return new ExampleStream(context_id, this);
  }
}

class ExampleStream extends Context {
  rules: Rules;

  constructor(context_id: u32, root: ExampleRoot) {
    super(context_id, root);
    this.rules = root.rules;
  }

  onRequestHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    for (let i = 0; i < this.rules.require.length; i++) {
      const name = this.rules.require[i];
      if (stream_context.headers.request.get(name).length == 0) {
        const extra: Array<HeaderPair> = [
          new HeaderPair(String.UTF8.encode("content-type"), String.UTF8.encode("text/plain")),
        ];
        send_local_response(403, "missing_header", String.UTF8.encode("missing header " + name + "\n"),
                            extra, GrpcStatusValues.InvalidCode); // -1: not a gRPC reply
        return FilterHeadersStatusValues.StopIteration;
      }
    }
    for (let i = 0; i < this.rules.addName.length; i++) {
      stream_context.headers.request.replace(this.rules.addName[i], this.rules.addValue[i]);
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new ExampleRoot(context_id); }, "example");
