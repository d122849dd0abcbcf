/// HOST:PORT, the one way Palisade reads and writes it: an IPv6 host in
/// brackets ("[fd00::1]:8080"), an IPv4 address or a name otherwise.
public struct HostPort: Hashable, Sendable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) { self.host = host; self.port = port }

    /// nil for a missing or out-of-range port (`ports` is the range
    /// allowed: 1...65535 for a destination, 0...65535 for a listener that
    /// may take any free port), an empty host, or an unbracketed IPv6 host.
    public init?(_ text: String, ports: ClosedRange<Int> = 1...65535) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), ports.contains(port) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        else if host.contains(":") { return nil }
        guard !host.isEmpty else { return nil }
        self.init(host: host, port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}
