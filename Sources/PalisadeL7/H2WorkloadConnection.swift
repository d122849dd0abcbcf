import NIOCore
import NIOHPACK
import NIOHTTP2

/// The workload's side of the HTTP/2 relay: one client connection to the
/// workload, framed here instead of by a second NIO HTTP/2 handler.
///
/// Why: running NIO's state machine a second time towards a local
/// workload cost ~18% of the proxy's samples under h2load (the caller's
/// side, `H2CallerConnection`, is the agent's own too now; both share
/// `H2Wire`'s reader and writer). What this side does, per RFC 9113:
/// HPACK (NIO's encoder and decoder, one table each way), SETTINGS and
/// their acknowledgement, PING answers, GOAWAY (streams the workload did
/// not take are refused to the caller, so it may retry them), both flow
/// control directions, the workload's concurrent-stream limit (requests
/// past it wait their turn), a response's framing (a head before any DATA,
/// trailers that end the stream, content-length kept) and every frame's
/// size and stream rules. A stream error resets that stream (the relay
/// resets the caller's); a connection error sends GOAWAY and closes, which
/// closes the caller's connection too.
///
/// Request DATA the workload's windows cannot take yet waits here (see
/// `H2Endpoint`, which both ends share), and the
/// caller's window is given back only once it is written: a caller cannot
/// make the agent hold more than the windows it was granted.
final class H2WorkloadConnection: H2Endpoint, @unchecked Sendable {
    /// Streams allocated but not opened: past the workload's limit.
    private var waiting: [Int32] = []
    private var waitingStart = 0
    private var active = 0
    private var nextID: Int32 = 1
    private var peerMaxStreams = Int.max
    /// The last stream of a GOAWAY from the workload: none above it is processed.
    private var goneAway: Int32?
    private var prefaceSent = false

    init(relay: H2Relay) {
        super.init(relay: relay, decoderTableSize: HPACKDecoder.maxDynamicTableSize)
    }

    // MARK: the relay's requests

    /// Opens a stream for a request (or queues it past the workload's
    /// limit). Nil when the connection takes no more streams (IDs used up,
    /// GOAWAY, failed): the caller's stream is then refused.
    func startRequest(_ headers: HPACKHeaders, endStream: Bool, isHead: Bool) -> HTTP2StreamID? {
        guard !failed, goneAway == nil, nextID < Int32.max - 2 else { return nil }
        let id = nextID
        nextID += 2
        streams[id] = H2Stream(sendWindow: peerInitialWindow, queue: [.headers(headers, endStream: endStream)], opened: false, isHead: isHead)
        if active < peerMaxStreams && waitingStart == waiting.count {
            open(id)
        } else {
            waiting.append(id)
        }
        return HTTP2StreamID(id)
    }

    /// The relay is done with a stream (the caller reset it, or its
    /// response was refused): RST_STREAM if the workload knows it.
    func reset(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode) {
        let key = Int32(id)
        guard let s = streams[key] else { return }
        if s.opened { writer.rstStream(key, code) }
        close(key, reason: code)
    }

    // MARK: the channel

    override func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        relay.up = self
        if context.channel.isActive { sendPreface() }
    }

    override func channelActive(context: ChannelHandlerContext) {
        sendPreface()
        context.fireChannelActive()
    }

    private func sendPreface() {
        guard !prefaceSent else { return }
        prefaceSent = true
        writer.out.writeBytes(L7ProtocolSniffer.preface)
        // ENABLE_PUSH 0, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE.
        let settings: [(UInt16, Int)] = [(2, 0), (4, H2Relay.streamWindow), (5, H2Relay.maxFrameSize), (6, H2Relay.maxHeaderListSize)]
        writer.frame(.settings, 0, 0) { b in
            for (id, value) in settings {
                b.writeInteger(id)
                b.writeInteger(UInt32(value))
            }
        }
        // A connection window larger than HTTP/2's initial 64 KiB.
        receiveWindow = H2Relay.connectionWindow
        writer.windowUpdate(0, H2Relay.connectionWindow - 65_535)
        flush()
    }

    override func channelReadComplete(context: ChannelHandlerContext) {
        relay.down?.flush()
        super.channelReadComplete(context: context)
    }

    override func detached() {
        if relay.up === self { relay.up = nil }
        waiting.removeAll()
    }

    // MARK: frames from the workload

    override func frame(_ type: H2Wire.FrameType, _ f: H2FrameReader.Frame) throws {
        switch type {
        case .data:
            try data(f.flags, f.stream, f.payload)
        case .priority:
            guard f.stream != 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 5 else { throw Failure(code: .frameSizeError) }
        case .rstStream:
            guard f.stream != 0, mayName(f.stream) else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 4 else { throw Failure(code: .frameSizeError) }
            let code = HTTP2ErrorCode(networkCode: Int(f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)!))
            guard streams[f.stream] != nil else { return }
            relay.fromUp(HTTP2Frame(streamID: HTTP2StreamID(f.stream), payload: .rstStream(code)))
            close(f.stream, reason: code)
        case .goAway:
            guard f.stream == 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes >= 8 else { throw Failure(code: .frameSizeError) }
            goAway(last: Int32(bitPattern: f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)! & 0x7FFF_FFFF))
        default:
            break
        }
    }

    /// A stream the workload may name: one we opened (it may have closed since).
    override func mayName(_ stream: Int32) -> Bool {
        stream & 1 == 1 && stream < nextID && (streams[stream]?.opened ?? true)
    }

    private func data(_ flags: UInt8, _ stream: Int32, _ payload: ByteBuffer) throws {
        guard stream != 0, mayName(stream) else { throw Failure(code: .protocolError) }
        let flowLength = payload.readableBytes
        receiveWindow -= flowLength
        guard receiveWindow >= 0 else { throw Failure(code: .flowControlError) }
        let body = try H2Wire.unpadded(flags, payload)
        let endStream = flags & Flag.endStream != 0
        guard var s = streams[stream] else {
            // A stream closed here (reset): its bytes still count on the connection.
            relay.acknowledgeUp(flowLength)
            return
        }
        guard !s.remoteEnded else { return streamError(stream, .streamClosed, connectionCredit: flowLength) }
        s.receiveWindow -= flowLength
        guard s.receiveWindow >= 0 else { return streamError(stream, .flowControlError, connectionCredit: flowLength) }
        guard s.response == .body else { return streamError(stream, .protocolError, connectionCredit: flowLength) }
        if let left = s.contentLeft {
            let now = left - body.readableBytes
            guard now >= 0, !endStream || now == 0 else { return streamError(stream, .protocolError, connectionCredit: flowLength) }
            s.contentLeft = now
        }
        if endStream {
            s.remoteEnded = true
            s.response = .ended
        }
        streams[stream] = s
        relay.fromUp(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .data(.init(data: .byteBuffer(body), endStream: endStream))),
                     credit: flowLength)
        if endStream { closeIfDone(stream) }
    }

    override func headerBlock(_ stream: Int32, _ block: ByteBuffer, endStream: Bool, dependency: Int32?) throws {
        guard mayName(stream) else { throw Failure(code: .protocolError) }
        var b = block
        // Decoded even for a stream closed here: the table is the connection's.
        let decoded: HPACKHeaders
        do { decoded = try decoder.decodeHeaders(from: &b) } catch { throw Failure(code: .compressionError) }
        guard var s = streams[stream] else { return }
        guard !s.remoteEnded else { return streamError(stream, .streamClosed) }
        switch s.response {
        case .awaitingHead:
            let status = decoded.first(name: ":status") ?? ""
            if status.utf8.first == UInt8(ascii: "1") {
                guard !endStream else { return streamError(stream, .protocolError) }   // 1xx: a final head follows
            } else {
                guard let left = contentLength(decoded, status: status, isHead: s.isHead) else {
                    return streamError(stream, .protocolError)
                }
                guard !endStream || (left ?? 0) == 0 else { return streamError(stream, .protocolError) }
                s.contentLeft = left
                s.response = endStream ? .ended : .body
            }
        case .body:
            guard endStream, s.contentLeft ?? 0 == 0 else { return streamError(stream, .protocolError) }   // trailers end it
            s.response = .ended
        case .ended:
            return streamError(stream, .protocolError)
        }
        if endStream { s.remoteEnded = true }
        streams[stream] = s
        relay.fromUp(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .headers(.init(headers: decoded, endStream: endStream))))
        if endStream { closeIfDone(stream) }
    }

    /// Body bytes a response's head promises: .some(nil) when it says
    /// nothing, nil when its content-length is malformed or contradicts
    /// itself (RFC 9113 §8.1.1).
    private func contentLength(_ h: HPACKHeaders, status: String, isHead: Bool) -> Int?? {
        if isHead || status == "304" { return .some(0) }
        return H2Fields.contentLength(of: h)
    }

    override func setting(_ id: UInt16, _ value: UInt32) throws {
        if id == 0x3 { peerMaxStreams = Int(value) }   // MAX_CONCURRENT_STREAMS
    }

    override func settingsApplied() { openWaiting() }

    /// Streams above the workload's last one were never processed: refused
    /// to the caller (who may retry them elsewhere).
    private func goAway(last: Int32) {
        goneAway = min(goneAway ?? last, last)
        for key in streams.keys.sorted() where key > last {
            close(key, reason: .refusedStream)
        }
    }

    override func streamError(_ stream: Int32, _ code: HTTP2ErrorCode) {
        streamError(stream, code, connectionCredit: 0)
    }

    /// RST_STREAM to the workload; the relay resets the caller's stream.
    private func streamError(_ stream: Int32, _ code: HTTP2ErrorCode, connectionCredit: Int) {
        if connectionCredit > 0 { relay.acknowledgeUp(connectionCredit) }
        guard streams[stream] != nil else { return }
        writer.rstStream(stream, code)
        close(stream, reason: code)
    }

    override func closed(_ stream: Int32, _ s: H2Stream, reason: HTTP2ErrorCode?) {
        if s.opened { active -= 1 }
        relay.streamClosed(HTTP2StreamID(stream), onDown: false, reason: reason)
        openWaiting()
    }

    override func dataTaken(source: HTTP2StreamID, _ credit: Int, sent: Bool, streamOpen: Bool) {
        relay.requestDataTaken(source: source, credit, sent: sent, streamOpen: streamOpen)
    }

    // MARK: sending

    private func open(_ stream: Int32) {
        guard streams[stream] != nil else { return }
        streams[stream]!.opened = true
        active += 1
        drain(stream)
    }

    private func openWaiting() {
        // (After a GOAWAY every stream still waiting is above its last: refused.)
        guard goneAway == nil else { return }
        while active < peerMaxStreams, waitingStart < waiting.count {
            let id = waiting[waitingStart]
            waitingStart += 1
            if streams[id] != nil { open(id) }
        }
        if waitingStart == waiting.count {
            waiting.removeAll(keepingCapacity: true)
            waitingStart = 0
        }
    }
}
