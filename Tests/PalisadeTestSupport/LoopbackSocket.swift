import Foundation

/// A blocking client socket (TCP on 127.0.0.1, or a unix socket) for tests
/// that speak to a server byte by byte: partial requests, silence,
/// half-closes, counting closes.
public final class LoopbackSocket {
    public let fd: Int32

    /// Connects to 127.0.0.1:port; nil when the connection is refused.
    public init?(port: Int, receiveTimeout seconds: Int = 5) {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = in_port_t(UInt16(port).bigEndian)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        guard let fd = Self.connected(AF_INET, to: a, receiveTimeout: seconds) else { return nil }
        self.fd = fd
    }

    /// A stream socket of `family` connected to `address`, or nil.
    private static func connected<Address>(_ family: Int32, to address: Address, receiveTimeout seconds: Int) -> Int32? {
        let fd = socket(family, Int32(SOCK_STREAM.rawValue), 0)
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var a = address
        let r = withUnsafePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<Address>.size)) } }
        if r != 0 { Glibc.close(fd); return nil }
        return fd
    }

    /// Connects to a unix stream socket; nil when that fails.
    public init?(unixPath: String, receiveTimeout seconds: Int = 5) {
        var a = sockaddr_un()
        a.sun_family = sa_family_t(AF_UNIX)
        let path = Array(unixPath.utf8)
        guard path.count < MemoryLayout.size(ofValue: a.sun_path) else { return nil }
        withUnsafeMutableBytes(of: &a.sun_path) { raw in raw.copyBytes(from: path) }
        guard let fd = Self.connected(AF_UNIX, to: a, receiveTimeout: seconds) else { return nil }
        self.fd = fd
    }

    deinit { Glibc.close(fd) }

    /// Sends every byte; false when the peer is gone.
    @discardableResult
    public func send(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            sent += n
        }
        return true
    }

    @discardableResult
    public func send(_ text: String) -> Bool { send(Array(text.utf8)) }

    public func shutdownWrite() { shutdown(fd, Int32(SHUT_WR)) }

    /// Everything until the peer closes; nil on a reset or the receive timeout.
    public func readToEnd() -> [UInt8]? {
        var got: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = recv(fd, &buf, buf.count, 0)
            if n < 0 { return errno == ECONNRESET && !got.isEmpty ? got : nil }
            if n == 0 { return got }
            got += buf[0..<n]
        }
    }

    /// Whatever arrives within the receive timeout, at least one read's worth.
    public func readSome() -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = recv(fd, &buf, buf.count, 0)
        return n > 0 ? Array(buf[0..<n]) : []
    }

    /// Has the peer closed this connection (EOF or reset within `seconds`)?
    public func closedByPeer(within seconds: Double) -> Bool {
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&p, 1, Int32(seconds * 1000)) == 1 else { return false }
        var b: UInt8 = 0
        return recv(fd, &b, 1, Int32(MSG_DONTWAIT) | Int32(MSG_PEEK)) <= 0
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now (the kernel picks
/// it), for a server a test is about to start; random picks collided.
public func freeLoopbackPort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var a = sockaddr_in(); a.sin_family = sa_family_t(AF_INET); a.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &a) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 ? getsockname(fd, $0, &len) : -1 } }
    return Int(UInt16(bigEndian: a.sin_port))
}
