import NIOCore
import NIOHPACK
import NIOHTTP2

/// The caller's side of the HTTP/2 relay: the server end of the caller's
/// connection, framed here instead of by NIO's HTTP/2 handler.
///
/// Why: under h2load NIO's handler on this side (its stream state machine,
/// frame objects, its own flow-control buffers, and a second HPACK pass
/// through them) was ~35% of the proxy's samples, where all the relay
/// needs is each stream's decoded head and its bytes. This side faces
/// whoever reaches the port, so it does, per RFC 9113 and RFC 7541, what
/// NIO's handler did and h2spec checks (146 cases, tools/testing/
/// h2-conformance):
///
/// - the client preface, then SETTINGS first; every frame's size, stream
///   and state rules (idle, open, half-closed, closed; streams the agent
///   reset have their late frames ignored, others closed get
///   STREAM_CLOSED); padding; PRIORITY's self-dependency; CONTINUATION
///   sequencing;
/// - HPACK through NIO's decoder (table size 4,096, header lists up to
///   64 KiB) and encoder (to the caller's HEADER_TABLE_SIZE); every
///   header block is decoded, refused streams' too, so the table stays in
///   step;
/// - request heads and trailers by `H2Fields` (malformed: PROTOCOL_ERROR
///   on that stream), content-length against the DATA received;
/// - both flow-control directions: request DATA past a window is an error,
///   response DATA waits here for the caller's windows and the workload's
///   window comes back only once it is written, so neither side can make
///   the agent hold more than the windows it granted;
/// - the flood limits NIO had (and the WINDOW_UPDATE one of H2CallerGuard),
///   each ending the connection with GOAWAY ENHANCE_YOUR_CALM: 200
///   RST_STREAM in 30 s (rapid reset), 200 stream errors, 16 empty DATA
///   frames in a row, 10,000 control answers while the caller does not
///   read, 256 frames or 128 KiB in one header block, more WINDOW_UPDATEs
///   than the data sent explains; 256 concurrent streams (REFUSED_STREAM
///   past it).
///
/// A connection error sends GOAWAY and closes (RFC 9113 §5.4.1); the
/// workload's connection closes with it.
final class H2CallerConnection: H2Endpoint, @unchecked Sendable {
    static let maxConcurrentStreams = 256
    static let maxResets = 200
    static let resetWindow = TimeAmount.seconds(30)
    static let maxGlitches = 200
    static let maxEmptyDataFrames = 16
    static let maxControlAnswersUnread = 10_000
    /// WINDOW_UPDATE frames allowed beyond two per DATA frame sent and one
    /// per stream opened.
    static let windowUpdateSlack = 1000

    /// The highest stream the caller opened: any above is idle.
    private var lastStream: Int32 = 0
    private var prefaceLeft = L7ProtocolSniffer.preface.count
    private var callerWentAway = false

    // Flood accounting.
    private var resets = 0
    private var resetsSince = NIODeadline.uptimeNanoseconds(0)
    private var glitches = 0
    private var emptyDataRun = 0
    private var controlAnswersUnread = 0
    private var unearnedWindowUpdates = 0

    /// Streams the agent reset: their late frames are ignored.
    private var resetHere = RecentSet<Int32>()
    /// Streams that were open once: a HEADERS on one is STREAM_CLOSED, on
    /// any other below `lastStream` PROTOCOL_ERROR (RFC 9113 §5.1.1).
    private var openedOnce = RecentSet<Int32>()

    init(relay: H2Relay) {
        // (We announce no HEADER_TABLE_SIZE: the caller's encoder keeps to 4,096.)
        super.init(relay: relay, decoderTableSize: HPACKEncoder.defaultDynamicTableSize)
        receiveWindow = H2Relay.connectionWindow
    }

    var eventLoop: EventLoop? { context?.eventLoop }

    // MARK: the relay's responses

    /// The relay ends a stream (a refused request, the workload's reset).
    func reset(_ id: HTTP2StreamID, _ code: HTTP2ErrorCode) {
        let key = Int32(id)
        guard !failed, context != nil else { return }
        writer.rstStream(key, code)
        resetHere.insert(key)
        close(key, reason: code)
    }

    override func flush() {
        super.flush()
        if let context, context.channel.isWritable { controlAnswersUnread = 0 }
    }

    // MARK: the channel

    override func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        relay.down = self
        // Our SETTINGS (the server's preface) and a connection window
        // larger than HTTP/2's initial 64 KiB.
        let settings: [(UInt16, Int)] = [(2, 0), (3, Self.maxConcurrentStreams), (4, H2Relay.streamWindow),
                                         (5, H2Relay.maxFrameSize), (6, H2Relay.maxHeaderListSize)]
        writer.frame(.settings, 0, 0) { b in
            for (id, value) in settings {
                b.writeInteger(id)
                b.writeInteger(UInt32(value))
            }
        }
        writer.windowUpdate(0, H2Relay.connectionWindow - 65_535)
        flush()
    }

    override func channelReadComplete(context: ChannelHandlerContext) {
        relay.answerDenials()
        relay.up?.flush()
        flush()
        context.fireChannelReadComplete()
    }

    override func detached() {
        if relay.down === self { relay.down = nil }
    }

    /// The client preface, compared as it arrives: a wrong byte is an
    /// error at once, not after 24 bytes.
    override func readPrefix() throws -> Bool {
        guard prefaceLeft > 0 else { return true }
        let expected = L7ProtocolSniffer.preface
        guard var got = reader.take(upTo: prefaceLeft) else { return false }
        var offset = expected.count - prefaceLeft
        while let b = got.readInteger(as: UInt8.self) {
            guard b == expected[offset] else { throw Failure(code: .protocolError) }
            offset += 1
        }
        prefaceLeft = expected.count - offset
        return prefaceLeft == 0
    }

    // MARK: frames from the caller

    override func frame(_ type: H2Wire.FrameType, _ f: H2FrameReader.Frame) throws {
        switch type {
        case .data:
            try data(f.flags, f.stream, f.payload)
        case .priority:
            guard f.stream != 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 5 else { return streamError(f.stream, .frameSizeError) }
            let d = Int32(bitPattern: f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)! & 0x7FFF_FFFF)
            if d == f.stream { streamError(f.stream, .protocolError) }
        case .rstStream:
            guard f.stream != 0, f.stream <= lastStream else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes == 4 else { throw Failure(code: .frameSizeError) }
            try countReset()
            guard streams[f.stream] != nil else { return }
            close(f.stream, reason: HTTP2ErrorCode(networkCode: Int(f.payload.getInteger(at: f.payload.readerIndex, as: UInt32.self)!)))
        case .goAway:
            guard f.stream == 0 else { throw Failure(code: .protocolError) }
            guard f.payload.readableBytes >= 8 else { throw Failure(code: .frameSizeError) }
            callerWentAway = true
        default:
            break
        }
    }

    private func data(_ flags: UInt8, _ stream: Int32, _ payload: ByteBuffer) throws {
        guard stream != 0, stream <= lastStream else { throw Failure(code: .protocolError) }
        let flowLength = payload.readableBytes
        receiveWindow -= flowLength
        guard receiveWindow >= 0 else { throw Failure(code: .flowControlError) }
        let body = try H2Wire.unpadded(flags, payload)
        let endStream = flags & Flag.endStream != 0
        guard var s = streams[stream], !s.remoteEnded else {
            // Closed or half-closed (remote): its bytes still count on the connection.
            relay.callerDataDropped(flowLength)
            if streams[stream] == nil && resetHere.contains(stream) { return }   // late frames of a stream we reset
            return streamError(stream, .streamClosed)
        }
        s.receiveWindow -= flowLength
        guard s.receiveWindow >= 0 else {
            relay.callerDataDropped(flowLength)
            return streamError(stream, .flowControlError)
        }
        if body.readableBytes == 0 && !endStream {
            emptyDataRun += 1
            guard emptyDataRun <= Self.maxEmptyDataFrames else { throw Failure(code: .enhanceYourCalm) }
        } else {
            emptyDataRun = 0
        }
        if let left = s.contentLeft {
            let now = left - body.readableBytes
            guard now >= 0, !endStream || now == 0 else {
                relay.callerDataDropped(flowLength)
                return streamError(stream, .protocolError)
            }
            s.contentLeft = now
        }
        if endStream { s.remoteEnded = true }
        streams[stream] = s
        let padding = flags & Flag.padded != 0 ? flowLength - body.readableBytes - 1 : nil
        relay.fromDown(HTTP2Frame(streamID: HTTP2StreamID(stream),
                                  payload: .data(.init(data: .byteBuffer(body), endStream: endStream, paddingBytes: padding))))
        if endStream { closeIfDone(stream) }
    }

    override func headerBlock(_ stream: Int32, _ block: ByteBuffer, endStream: Bool, dependency: Int32?) throws {
        guard stream & 1 == 1 else { throw Failure(code: .protocolError) }   // a client's streams are odd
        var b = block
        // Decoded whatever becomes of the stream: the table is the connection's.
        let decoded: HPACKHeaders
        do { decoded = try decoder.decodeHeaders(from: &b) } catch { throw Failure(code: .compressionError) }
        if dependency == stream { return streamError(stream, .protocolError) }
        if var s = streams[stream] {
            // Trailers: they end the request, regular fields only.
            guard !s.remoteEnded else { return streamError(stream, .streamClosed) }
            guard endStream, H2Fields.validTrailers(decoded), s.contentLeft ?? 0 == 0 else {
                return streamError(stream, .protocolError)
            }
            s.remoteEnded = true
            streams[stream] = s
            relay.fromDown(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .headers(.init(headers: decoded, endStream: true))))
            return closeIfDone(stream)
        }
        if stream <= lastStream {
            if resetHere.contains(stream) { return }   // late frames of a stream we reset
            throw Failure(code: openedOnce.contains(stream) ? .streamClosed : .protocolError)
        }
        lastStream = stream
        guard !callerWentAway, streams.count < Self.maxConcurrentStreams else { return streamError(stream, .refusedStream) }
        guard H2Fields.validRequest(decoded), let length = H2Fields.contentLength(of: decoded), !endStream || (length ?? 0) == 0 else {
            return streamError(stream, .protocolError)
        }
        unearnedWindowUpdates -= 1
        openedOnce.insert(stream)
        streams[stream] = H2Stream(sendWindow: peerInitialWindow, remoteEnded: endStream, contentLeft: length)
        relay.fromDown(HTTP2Frame(streamID: HTTP2StreamID(stream), payload: .headers(.init(headers: decoded, endStream: endStream))))
    }

    override func mayName(_ stream: Int32) -> Bool { stream <= lastStream }

    override func windowUpdate(from stream: Int32, _ n: Int) throws {
        unearnedWindowUpdates += 1
        guard unearnedWindowUpdates <= Self.windowUpdateSlack else { throw Failure(code: .enhanceYourCalm) }
        try super.windowUpdate(from: stream, n)
    }

    override func dataFrameSent() { unearnedWindowUpdates -= 2 }   // (a stream's and the connection's window)

    /// Rapid reset (CVE-2023-44487): RST_STREAM frames counted per 30 s.
    private func countReset() throws {
        let now = NIODeadline.now()
        if now - resetsSince > Self.resetWindow {
            resetsSince = now
            resets = 0
        }
        resets += 1
        guard resets <= Self.maxResets else { throw Failure(code: .enhanceYourCalm) }
    }

    /// A SETTINGS or PING answer: at most so many between two flushes
    /// after which the caller's channel still took everything (as NIO's
    /// handler buffered control frames while its channel was unwritable).
    override func answered() throws {
        controlAnswersUnread += 1
        guard controlAnswersUnread <= Self.maxControlAnswersUnread else { throw Failure(code: .enhanceYourCalm) }
    }

    /// RST_STREAM to the caller for a stream error of its own making.
    override func streamError(_ stream: Int32, _ code: HTTP2ErrorCode) {
        glitches += 1
        guard glitches <= Self.maxGlitches else { return fail(.enhanceYourCalm) }
        writer.rstStream(stream, code)
        resetHere.insert(stream)
        close(stream, reason: code)
    }

    override var lastProcessedStream: Int32 { lastStream }

    override func closed(_ stream: Int32, _ s: H2Stream, reason: HTTP2ErrorCode?) {
        relay.streamClosed(HTTP2StreamID(stream), onDown: true, reason: reason)
    }

    override func dataTaken(source: HTTP2StreamID, _ credit: Int, sent: Bool, streamOpen: Bool) {
        relay.responseDataTaken(source: source, credit, sent: sent, streamOpen: streamOpen)
    }
}
