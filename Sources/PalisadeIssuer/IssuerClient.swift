import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import PalisadeCA
import PalisadeIdentity
import SwiftASN1
import X509

/// A node's signer when its trust domain has an issuer: CSRs go to
/// `palisade ca serve` over TLS 1.3, authenticated by the node's SVID (or,
/// before the node has one, by a one-time join token). The issuer must
/// present an SVID for spiffe://TD/palisade/issuer chaining to the bundle
/// the operator gave this node. No signing key is ever on the node.
public final class IssuerClient: SVIDSigner, @unchecked Sendable {
    /// The issuers, tried in turn when one cannot be reached (each with its
    /// own intermediate of the trust domain's root).
    public let addresses: [HostPort]
    private let preferred = NIOLockedValueBox(0)
    public let nodeID: SpiffeID
    /// The node's current SVID files (chain PEM, key PEM), if valid.
    let credentials: @Sendable () -> (chain: String, key: String)?
    /// A join token, if the operator gave one (read when needed).
    let joinToken: @Sendable () -> String?
    private let roots: NIOLockedValueBox<[Certificate]>
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    public var timeout: TimeAmount = .seconds(10)
    /// Called with the bundle (PEM) when the issuer's changes it, to keep
    /// it across restarts: a node that restarts after a rotation finished
    /// must still recognise the issuer.
    public var onBundleChange: (@Sendable (String) -> Void)?

    public init(addresses: [HostPort], nodeID: SpiffeID, bundle: [Certificate],
                credentials: @escaping @Sendable () -> (chain: String, key: String)?, joinToken: @escaping @Sendable () -> String?) {
        precondition(!addresses.isEmpty)
        self.addresses = addresses; self.nodeID = nodeID
        self.credentials = credentials; self.joinToken = joinToken
        roots = NIOLockedValueBox(bundle)
    }

    deinit { try? group.syncShutdownGracefully() }

    /// The trust domain's roots, as the issuer last served them.
    public var bundle: [Certificate] { roots.withLockedValue { $0 } }

    public func sign(_ requests: [SVIDRequest], lifetime: TimeInterval, now: Date) throws -> [SpiffeID: Result<[Certificate], CAError>] {
        guard let creds = credentials() else {
            // No valid node SVID: the node joins (again) with a token.
            guard let node = requests.first(where: { $0.id == nodeID }) else {
                throw CAError("no valid node SVID yet: the node's own SVID comes first")
            }
            guard let token = joinToken(), !token.isEmpty else {
                throw CAError("no valid node SVID and no join token: run `palisade ca join-token --node NAME` where the issuer runs and give the token to this node (issuer.joinTokenFile)")
            }
            let body = try JSONEncoder().encode(IssuerAPI.JoinRequest(token: token, csr: node.csr.serializeAsPEM().pemString))
            let (status, data) = try request("/v1/join", body: body, credentials: nil)
            guard status == 200, let r = try? JSONDecoder().decode(IssuerAPI.JoinResponse.self, from: data) else {
                let reason = (try? JSONDecoder().decode(IssuerAPI.ErrorResponse.self, from: data))?.error ?? "status \(status)"
                return [node.id: .failure(CAError("join refused: \(reason)"))]
            }
            try updateBundle(r.bundle)
            return [node.id: Result { try Self.certificates(r.chain) }.mapError { CAError("\($0)") }]
        }
        let pems = try requests.map { try $0.csr.serializeAsPEM().pemString }
        let body = try JSONEncoder().encode(IssuerAPI.SignRequest(csrs: pems, lifetimeSeconds: lifetime))
        let (status, data) = try request("/v1/sign", body: body, credentials: creds)
        guard status == 200, let r = try? JSONDecoder().decode(IssuerAPI.SignResponse.self, from: data), r.results.count == requests.count else {
            let reason = (try? JSONDecoder().decode(IssuerAPI.ErrorResponse.self, from: data))?.error ?? "status \(status)"
            throw CAError("the issuer refused the request: \(reason)")
        }
        try updateBundle(r.bundle)
        var out: [SpiffeID: Result<[Certificate], CAError>] = [:]
        for (req, res) in zip(requests, r.results) {
            if let chain = res.chain { out[req.id] = Result { try Self.certificates(chain) }.mapError { CAError("\($0)") } }
            else { out[req.id] = .failure(CAError(res.error ?? "refused")) }
        }
        return out
    }

    /// Asks the issuer for its bundle (a liveness check that also brings a
    /// new root the issuer added), telling it which roots this node trusts;
    /// returns the issuer's signing generation. Throws when it cannot be reached.
    @discardableResult
    public func probe() throws -> Int {
        // A short deadline: the agent's loop waits for this answer.
        let trusts = bundle.map { $0.serialNumber.description }.joined(separator: ",")
        let (status, data) = try request("/v1/bundle", body: Data(), credentials: credentials(), method: .GET, timeout: .seconds(2),
                                         headers: [(IssuerAPI.trustsHeader, trusts)])
        guard status == 200, let r = try? JSONDecoder().decode(IssuerAPI.BundleResponse.self, from: data) else {
            throw CAError("the issuer answered \(status) to /v1/bundle")
        }
        try updateBundle(r.bundle)
        return r.generation ?? 0
    }

    static func certificates(_ pem: String) throws -> [Certificate] {
        try PEMDocument.parseMultiple(pemString: pem).map { try Certificate(pemDocument: $0) }
    }

    /// The issuer's bundle is taken only if it still holds a root this node
    /// already trusts (a new root arrives beside the old one, never alone).
    func updateBundle(_ pem: String) throws {
        let served = try Self.certificates(pem)
        let changed = roots.withLockedValue { current -> Bool in
            guard !served.isEmpty, served.contains(where: { current.contains($0) }), served != current else { return false }
            current = served
            return true
        }
        if changed { onBundleChange?(pem) }
    }

    /// One HTTPS request to the issuer; blocks the caller (never an event loop).
    /// One HTTPS request to the first issuer that can be reached (the one
    /// that answered last is tried first); blocks the caller (never an
    /// event loop). An answer, even a refusal, is final; only an issuer that
    /// cannot be reached passes the request to the next.
    func request(_ path: String, body: Data, credentials: (chain: String, key: String)?, method: HTTPMethod = .POST,
                 timeout: TimeAmount? = nil, headers extra: [(String, String)] = []) throws -> (Int, Data) {
        let first = preferred.withLockedValue { $0 }
        var failures: [String] = []
        for k in 0..<addresses.count {
            let i = (first + k) % addresses.count
            do {
                let answer = try requestOnce(addresses[i], path, body: body, credentials: credentials, method: method, timeout: timeout, headers: extra)
                preferred.withLockedValue { $0 = i }
                return answer
            } catch let e as IssuerUnreachable {
                failures.append(e.description)
            }
        }
        throw CAError(failures.joined(separator: "; "))
    }

    struct IssuerUnreachable: Error, CustomStringConvertible { var description: String }

    private func requestOnce(_ address: HostPort, _ path: String, body: Data, credentials: (chain: String, key: String)?, method: HTTPMethod,
                             timeout: TimeAmount?, headers extra: [(String, String)]) throws -> (Int, Data) {
        let (host, port) = (address.host, address.port)
        let timeout = timeout ?? self.timeout
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv13
        tls.maximumTLSVersion = .tlsv13
        tls.certificateVerification = .noHostnameVerification
        tls.trustRoots = .certificates(try bundle.map { try NIOSSLCertificate(bytes: $0.serializeAsPEM().derBytes, format: .der) })
        if let credentials {
            tls.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(credentials.chain.utf8)).map { .certificate($0) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(credentials.key.utf8), format: .pem))
        }
        let context = try NIOSSLContext(configuration: tls)
        let verifier = SPIFFEVerifier(bundles: [nodeID.trustDomain: bundle])
        let issuerID = try SpiffeID("spiffe://\(nodeID.trustDomain)\(IssuerAPI.issuerPath())")
        let verify: @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResultWithMetadata>) -> Void = { certs, promise in
            Task {
                let parsed = certs.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
                guard parsed.count == certs.count, let leaf = parsed.first,
                      case .success(let id) = await verifier.verify(leaf: leaf, intermediates: Array(parsed.dropFirst())), id == issuerID else {
                    promise.succeed(.failed)
                    return
                }
                promise.succeed(.certificateVerified(VerificationMetadata(nil)))
            }
        }
        let response = group.next().makePromise(of: (Int, Data).self)
        let connecting = ClientBootstrap(group: group)
            .connectTimeout(timeout)
            .channelInitializer { ch in
                ch.eventLoop.makeCompletedFuture {
                    try ch.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: context, serverHostname: nil,
                                                                                  customVerificationCallbackWithMetadata: verify))
                    try ch.pipeline.syncOperations.addHTTPClientHandlers()
                    try ch.pipeline.syncOperations.addHandler(ResponseCollector(promise: response))
                }
            }
            .connect(host: host, port: port)
        let channel: Channel
        do { channel = try connecting.wait() } catch {
            response.fail(error)   // (a promise must be completed, even unused)
            throw IssuerUnreachable(description: "cannot reach the issuer at \(address): \(error)")
        }
        defer { channel.close(promise: nil) }
        var head = HTTPRequestHead(version: .http1_1, method: method, uri: path)
        head.headers.add(name: "host", value: host)
        head.headers.add(name: "content-type", value: "application/json")
        head.headers.add(name: "content-length", value: "\(body.count)")
        for (name, value) in extra { head.headers.add(name: name, value: value) }
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil)
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let deadline = channel.eventLoop.scheduleTask(in: timeout) { response.fail(IssuerUnreachable(description: "the issuer at \(address) did not answer in time")) }
        defer { deadline.cancel() }
        do { return try response.futureResult.wait() } catch let e as IssuerUnreachable { throw e } catch {
            throw IssuerUnreachable(description: "the issuer at \(address): \(error)")
        }
    }
}

/// Gathers one response (bounded) and completes the promise.
final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPClientResponsePart
    let promise: EventLoopPromise<(Int, Data)>
    private var status = 0
    private var body = Data()
    init(promise: EventLoopPromise<(Int, Data)>) { self.promise = promise }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): status = Int(h.status.code)
        case .body(let b): if body.count < 16 << 20 { body.append(contentsOf: b.readableBytesView) }
        case .end: promise.succeed((status, body))
        }
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(CAError("issuer connection: \(error)"))
        context.close(promise: nil)
    }
    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(CAError("the issuer closed the connection (handshake refused?)"))
    }
}
